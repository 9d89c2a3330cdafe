"""Plans a training run for a GPU cluster on this machine: does the train step fit?

    python scripts/plan.py --config configs/qwen3_30b_a3b.yaml --gpu h200 --mesh 4x8

compiles the jitted train step that scripts/train.py runs (models.steps.Model, its
real shardings, the config's global batch) for `--mesh` NxG GPUs of kind `--gpu`
without a GPU (hiermoe_jax.gpu_aot: abstract inputs on a mesh of compile-only CUDA
devices), then prints per-device memory against the GPU's, the compile time and the
program's collectives (which devices talk, how many bytes), grouped; `--json OUT`
writes all of it, every collective listed. Speed is not measured (no autotuning
without a device).

A preset names its cluster in a comment, read as the default --gpu / --mesh:

    # target: gpu=h200 mesh=4x8

Exit codes: 0 fits; 1 does not fit (one line on stderr: needed and available bytes);
2 bad input or the gpu-aot extra missing (one line on stderr).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pathlib
import re
import sys
import tempfile
import time

GiB = 1 << 30
TARGET = re.compile(r"^\s*#\s*target:(.*)$", re.MULTILINE)
TARGET_KEYS = ("gpu", "mesh")
# What the CUDA plugin prints on stderr when jax starts on a machine without a driver.
_DRIVER_NOISE = re.compile(r"Could not find cuda drivers|All log messages before absl::")


# ----------------------------------------------------------------------------- inputs

def gpu_name(text: str) -> str:
  """type= for --gpu: a key of gpu_aot.GPUS."""
  from hiermoe_jax import gpu_aot
  if text.lower() not in gpu_aot.GPUS:
    raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be one of "
                                     f"{', '.join(gpu_aot.GPUS)}")
  return text.lower()


def read_target(path: str | pathlib.Path) -> dict:
  """{"gpu": str, "mesh": (nodes, local)} from the config's `# target:` comment (those
  it names; {} without one), so a preset carries its cluster until the schema has keys."""
  from hiermoe_jax.bench import cli
  try:
    text = pathlib.Path(path).read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError):
    return {}  # load_config reports an unreadable file
  match = TARGET.search(text)
  if match is None:
    return {}
  where = f"'# target:' in {str(path)!r}"
  target = {}
  for item in match[1].split():
    key, sep, value = item.partition("=")
    if not sep or key not in TARGET_KEYS:
      raise cli.ConfigError(f"{where}: {item!r} is invalid: expected key=value with key in "
                            f"{', '.join(TARGET_KEYS)}, e.g. gpu=h200 mesh=4x8")
    try:
      target[key] = gpu_name(value) if key == "gpu" else cli.mesh_shape(value)
    except argparse.ArgumentTypeError as e:
      raise cli.ConfigError(f"{where}: {key}={e}") from None
  return target


def resolve_cluster(args) -> tuple[str, int, int]:
  """(gpu, nodes, local): the options, else the config's `# target:` comment."""
  from hiermoe_jax.bench import cli
  target = read_target(args.config)
  gpu, mesh = args.gpu or target.get("gpu"), args.mesh or target.get("mesh")
  for option, value in (("--gpu", gpu), ("--mesh", mesh)):
    if value is None:
      raise cli.ConfigError(f"{option} is required: {str(args.config)!r} has no "
                            f"'# target: gpu=... mesh=NxG' comment naming it")
  return gpu, *mesh


# ----------------------------------------------------------------------------- compile

def abstract_batch(model):
  """(inputs, targets) as the trainer feeds them: int32 [batch_size, seq_len] (data.Batches)
  with the model's batch sharding."""
  import jax
  import jax.numpy as jnp
  tc = model.cfg.train
  batch = jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len), jnp.int32,
                               sharding=model.batch_sharding)
  return batch, batch


def compile_train_step(model):
  """The trainer's jitted train step compiled for `model.mesh` from abstract state and
  batch (nothing is allocated): (compiled, seconds to lower and compile)."""
  t0 = time.perf_counter()
  compiled = model.jit_train_step.lower(model.abstract_state(), *abstract_batch(model)).compile()
  return compiled, time.perf_counter() - t0


def make_plan(cfg, gpu: str, nodes: int, local: int) -> dict:
  """Compiles cfg's train step for nodes x local GPUs of kind `gpu`: the JSON record.

  Keys: gpu, gpu_name, mesh {nodes, local, devices}, batch {batch_size, seq_len},
  memory (gpu_aot.memory: argument/output/alias/temp/total/device _bytes, per device),
  fits (total <= device), compile_s (lower + compile), compiler_log (XLA's warnings),
  collective_groups (group_collectives), collectives (gpu_aot.collectives, each with
  operand_shapes) and auto_candidates. With the host-side auto (moe.dispatch=auto,
  train.auto_calibrate) each candidate strategy is compiled and the plan is the one
  that needs the most memory.
  """
  from hiermoe_jax import gpu_aot
  from models.config import ConfigError
  from models.steps import Model
  from models.train_loop import validate_run
  mesh = gpu_aot.mesh(gpu, nodes, local)
  try:
    validate_run(cfg, mesh)
  except ConfigError as e:
    raise ConfigError(f"--mesh={nodes}x{local} does not fit the config: {e}") from None
  model = Model(cfg, mesh)
  log = []  # XLA's warnings (e.g. remat could not get under the memory): in the report
  auto = {}  # host-side auto: every strategy it may fix, each its own program
  with native_stderr(log):
    if model.calibrating:
      from hiermoe_jax import calibrate
      for name in calibrate.candidates(cfg.moe, mesh):
        variant = model.with_dispatch((name,) * len(model.moe_layers))
        compiled, seconds = compile_train_step(variant)
        auto[name] = (gpu_aot.memory(compiled, gpu), compiled, seconds)
      # The plan is the candidate that needs the most memory: the run may fix any.
      _, compiled, seconds = max(auto.values(), key=lambda v: v[0]["total_bytes"])
    else:
      compiled, seconds = compile_train_step(model)
  memory = gpu_aot.memory(compiled, gpu)
  found = with_operand_shapes(gpu_aot.collectives(compiled, mesh), compiled.as_text())
  return {
      "gpu": gpu, "gpu_name": gpu_aot.GPUS[gpu].description,
      "mesh": {"nodes": nodes, "local": local, "devices": nodes * local},
      "batch": {"batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len},
      "memory": memory,
      "fits": memory["total_bytes"] <= memory["device_bytes"],
      "compile_s": round(seconds, 2),
      "compiler_log": [line for line in log if not _DRIVER_NOISE.search(line)],
      "collective_groups": group_collectives(found),
      "collectives": found,
      # moe.dispatch=auto decided on the host: total bytes per device of each candidate
      # (the plan above is the largest); {} for a fixed strategy or the in-graph auto.
      "auto_candidates": {name: m["total_bytes"] for name, (m, _, _) in auto.items()},
  }


_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+[a-z][\w\-]*\(([^)]*)\)")
_LAYOUT = re.compile(r"\{[\d,:A-Za-z()\s]*\}")


def with_operand_shapes(found: list[dict], hlo: str) -> list[dict]:
  """gpu_aot.collectives entries plus `operand_shapes` ("f32[4,512,128]", no layouts):
  bytes alone do not say which tensor a collective moves, shapes mostly do."""
  lines = [m for line in hlo.splitlines() if (m := _LINE.match(line))]
  shapes = {m[1]: _LAYOUT.sub("", m[2]) for m in lines}
  operands = {m[1]: re.findall(r"%([\w.\-]+)", m[3]) for m in lines}
  return [{**c, "operand_shapes": [shapes.get(o, "?") for o in operands.get(c["name"], [])]}
          for c in found]


def group_collectives(found: list[dict]) -> list[dict]:
  """Identical collectives (kind, replica groups, bytes) counted once, in program order:
  48 layers make a few dozen rows, not hundreds."""
  counts = collections.Counter()
  first = {}
  for c in found:
    key = (c["kind"], json.dumps(c["replica_groups"]), c["operand_bytes"], c["result_bytes"])
    counts[key] += 1
    first.setdefault(key, c)
  return [{"count": counts[key], "kind": c["kind"], "label": c["label"],
           "replica_groups": c["replica_groups"], "operand_bytes": c["operand_bytes"],
           "result_bytes": c["result_bytes"]} for key, c in first.items()]


# ----------------------------------------------------------------------------- report

def _size(n: int) -> str:
  for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if n >= scale:
      return f"{n / scale:,.1f} {unit}"
  return f"{n} B"


def _groups(groups: list[list[int]]) -> str:
  sample = ",".join(map(str, groups[0][:8])) + (",..." if len(groups[0]) > 8 else "")
  return f"{len(groups)} x {len(groups[0])} {{{sample}}}"


def report(plan: dict) -> str:
  """The plan as a table a person reads."""
  m, mesh = plan["memory"], plan["mesh"]
  verdict = "fits" if plan["fits"] else "does NOT fit"
  batch, where = plan["batch"], f"{mesh['nodes']}x{mesh['local']} {plan['gpu_name']}"
  share = m["total_bytes"] / m["device_bytes"]
  lines = [
      (f"{plan['config']}: train step on {where}, global batch {batch['batch_size']} x "
       f"{batch['seq_len']}; compiled in {plan['compile_s']:.1f} s (no GPU: speed not measured)"),
      "memory per device (total = arguments + outputs - aliased + temporaries):",
      *(f"  {name:<12}{_size(m[key]):>12}" for name, key in (
          ("arguments", "argument_bytes"), ("outputs", "output_bytes"),
          ("aliased", "alias_bytes"), ("temporaries", "temp_bytes"))),
      f"  {'total':<12}{_size(m['total_bytes']):>12} of {_size(m['device_bytes'])} ({share:.1%}): "
      + verdict,
      "collectives (bytes per device; groups: count x size {first group}):",
      f"  {'count':>5}  {'kind':<18}{'tier':<12}{'operand':>10}  {'result':>10}  groups",
  ]
  for g in plan["collective_groups"]:
    lines.append(f"  {g['count']:>5}  {g['kind']:<18}{g['label']:<12}"
                 f"{_size(g['operand_bytes']):>10}  {_size(g['result_bytes']):>10}  "
                 f"{_groups(g['replica_groups'])}")
  if any(g["kind"] == "ragged-all-to-all" for g in plan["collective_groups"]):
    lines.append("  (ragged-all-to-all: the operand counts the send and the receive buffer, "
                 "the result the receive buffer)")
  lines += [f"XLA: {line}" for line in plan["compiler_log"]]
  return "\n".join(lines)


def finish(plan: dict, json_path: str | None) -> int:
  """Prints the report, writes the JSON; 1 with one line on stderr if it does not fit."""
  print(report(plan))
  if json_path:
    pathlib.Path(json_path).write_text(json.dumps(plan, indent=1) + "\n", encoding="utf-8")
  if plan["fits"]:
    return 0
  m, mesh = plan["memory"], plan["mesh"]
  print(f"error: does not fit: the train step needs {m['total_bytes'] / GiB:.2f} GiB per "
        f"device on --mesh {mesh['nodes']}x{mesh['local']}, a --gpu {plan['gpu']} "
        f"({plan['gpu_name']}) has {m['device_bytes'] / GiB:.2f} GiB", file=sys.stderr)
  return 1


# ----------------------------------------------------------------------------- native stderr

@contextlib.contextmanager
def native_stderr(lines: list[str]):
  """Collects into `lines` what is written to file descriptor 2 meanwhile: XLA's and the
  CUDA plugin's native logging, which Python cannot catch otherwise. If the body raises,
  the lines go back to stderr before the exception."""
  sys.stderr.flush()
  saved = os.dup(2)
  failed = True
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield lines
      failed = False
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines += captured.read().decode(errors="replace").splitlines()
      if failed:
        _replay(lines)


def _replay(lines: list[str]) -> None:
  """Writes `lines` to stderr, without the CUDA plugin's driver-not-found notices."""
  for line in lines:
    if not _DRIVER_NOISE.search(line):
      print(line, file=sys.stderr)
  sys.stderr.flush()


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
  from hiermoe_jax.bench import cli
  p = cli.ArgumentParser(description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/tiny.yaml", help="YAML preset")
  p.add_argument("--gpu", type=gpu_name, help="h100, h200 or b200 (default: the config's "
                 "'# target:' comment)")
  p.add_argument("--mesh", type=cli.mesh_shape, metavar="NxG",
                 help="N nodes of G GPUs, e.g. 4x8 (default: the config's '# target:' comment)")
  p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                 help="override a config key (repeatable)")
  p.add_argument("--json", type=cli.output_file, metavar="OUT", help="write the plan as JSON")
  return p, p.parse_args(argv)


def main(argv=None) -> int:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the plugin registers only without cuda
  start_up = []  # the plugin's driver-not-found lines: an error stays one line
  with native_stderr(start_up):
    import jax
    jax.devices()  # backend start-up, where the plugin prints too
  _replay(start_up)
  parser, args = parse_args(argv)
  from models.config import ConfigError, load_config
  try:
    gpu, nodes, local = resolve_cluster(args)
    cfg = load_config(args.config, [*args.set, f"mesh.nodes={nodes}", f"mesh.local={local}"])
    plan = make_plan(cfg, gpu, nodes, local)
  except ConfigError as e:
    parser.error(str(e))
  plan = {"config": str(args.config), "overrides": args.set, **plan}
  return finish(plan, args.json)
