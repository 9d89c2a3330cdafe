"""`scripts/bench_comm.py`: mesh-level communication benchmark.

`--strategies` lists variants: a strategy name, or `name:field=value[:field=value]`
with MoEConfig's `comm_dtype` and `overlap_chunks` (`hiermoe_jax/bench/variants.py`),
e.g. `flat,hier_dedup,hier_dedup:comm_dtype=bfloat16:overlap_chunks=4`. Results are
labelled by the full spec (JSON: `strategy`, with `base_strategy` and `fields`).

`--analytic` replays every variant on a routing with `hiermoe_jax.traffic` and
prints rows / dispatch bytes per link class (bytes in each variant's wire dtype),
the `--profile` cost model's predicted ms, `auto`'s choice and the hottest
per-peer link, without running collectives, so it works for meshes far larger than
this machine.

Without `--analytic` it times dispatch + combine of each variant, interleaved, on
the mesh (`hiermoe_jax.bench.timed`): in one process on `--mesh NxG` host devices,
or one process per node under `scripts/launch.py`. Each result adds "time_ms"
{min, median, max} and "predicted_ms" (the `--profile` cost model on the same
buffer sizes). `--fit-profile OUT.json` first fits a cost profile on this mesh
(and then predicts with it).

`auto` in timed mode: with `--profile` (or `--fit-profile`) it is the in-graph `auto`
(the cost model prices the live routing per call, `lax.switch`); without, it calibrates
as the trainer's host-side auto does (`hiermoe_jax.calibrate`): each candidate's
dispatch + combine is timed on this routing and mesh, the fastest runs as a plain
program, and the report gives the calibration time ("calibration_ms") and the choice.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

from hiermoe_jax import calibrate, cost, traffic
from hiermoe_jax.bench import cli, synthetic
from hiermoe_jax.bench import variants as variants_lib
from hiermoe_jax.bench.variants import Variant
from hiermoe_jax.config import ConfigError
from hiermoe_jax.dispatch import auto, registry
from hiermoe_jax.mesh import MeshShape

BASELINES = ("gspmd",)  # timed mode only: XLA-partitioned dense dispatch
DEFAULT_MESH = (2, 4)
DTYPES = ("float32", "bfloat16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def build_parser() -> argparse.ArgumentParser:
  positive_int = cli.integer(1)
  p = cli.ArgumentParser(description=__doc__.split("\n")[0],
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--analytic", action="store_true",
                 help="count traffic on the host; run no collectives")
  p.add_argument("--mesh", type=cli.mesh_shape, default=None,
                 help="NxG: nodes x local devices (analytic default 2x4; timed default: "
                      "processes x local devices; NxG only in a single process)")
  p.add_argument("--experts", type=positive_int, default=64)
  p.add_argument("--topk", type=positive_int, default=8)
  p.add_argument("--tokens", type=positive_int, default=2048, help="tokens per device")
  p.add_argument("--hidden", type=positive_int, default=1024, help="model dim D")
  p.add_argument("--routing", default="uniform", help="uniform | zipf:ALPHA | file:PATH.npy | trace:PATH.npz[:LAYER] "
                 "(a recorded run's routing, hiermoe_jax/bench/synthetic.py)")
  p.add_argument("--seed", type=cli.seed, default=0)
  p.add_argument("--capacity-factor", type=cli.real(0, strict=True), default=None,
                 help="MoEConfig.capacity_factor; omit for dropless buffers")
  p.add_argument("--dtype", choices=DTYPES, default=None,
                 help="activation dtype: the rows timed, and the bytes per element of "
                      "the analytic columns (None: float32, or what --bytes-per-elem says)")
  p.add_argument("--bytes-per-elem", type=positive_int, default=None,
                 help="older spelling of --dtype: 4 (float32) or 2 (bfloat16); with "
                      "--dtype they must agree")
  p.add_argument("--strategies", default=",".join(registry.names()),
                 help=f"comma-separated variants NAME[:FIELD=VALUE...]: NAME one of "
                      f"{list(registry.names())} or auto (timed mode also "
                      f"{list(BASELINES)}); FIELD one of {list(variants_lib.FIELDS)}, e.g. "
                      "hier_dedup:comm_dtype=bfloat16:overlap_chunks=4")
  p.add_argument("--profile", default=None,
                 help="cost profile for predicted_ms and the in-graph auto: a shipped name "
                      "or a JSON path (default: 'default'; timed mode without it: auto "
                      "calibrates on the mesh)")
  p.add_argument("--json", type=cli.output_file, default=None,
                 help="write JSON here ('-' for stdout)")
  timed = p.add_argument_group("timed mode")
  timed.add_argument("--repeats", type=positive_int, default=5)
  timed.add_argument("--warmup", type=cli.integer(0), default=2,
                     help="untimed calls per strategy")
  timed.add_argument("--backward", action="store_true", help="also time the VJP")
  timed.add_argument("--gspmd-group", type=positive_int, default=256,
                     help="gspmd baseline: tokens per dispatch group (GShard's S)")
  timed.add_argument("--fit-profile", type=cli.output_file, default=None, metavar="OUT.json",
                     help="fit alpha/beta per stage kind on this mesh, write the profile, "
                          "and predict with it")
  timed.add_argument("--fit-only", action="store_true", help="with --fit-profile: skip the "
                     "strategy benchmark")
  timed.add_argument("--fit-max-mb", type=cli.real(0, strict=True), default=None,
                     help="largest fitted message (MB per stage); default: the largest "
                          "stage of the benchmarked strategies")
  timed.add_argument("--fit-points", type=cli.integer(2), default=6,
                     help="message sizes per stage kind (a line needs >= 2)")
  return p


def resolve_dtype(args) -> None:
  """Sets args.dtype and args.bytes_per_elem from --dtype and/or --bytes-per-elem."""
  given = args.bytes_per_elem
  if given is not None:
    implied = {n: d for d, n in DTYPE_BYTES.items()}.get(given)
    if args.dtype is None and implied is None:
      raise ConfigError(f"--bytes-per-elem={given} is invalid: must be 4 (float32) or 2 "
                        "(bfloat16); for a narrower wire use a variant, e.g. "
                        "--strategies hier_dedup:comm_dtype=float8_e4m3fn")
    if args.dtype is not None and DTYPE_BYTES[args.dtype] != given:
      raise ConfigError(f"--bytes-per-elem={given} is invalid: --dtype={args.dtype} has "
                        f"{DTYPE_BYTES[args.dtype]} bytes per element; give one of the two "
                        "or make them agree")
    args.dtype = args.dtype or implied
  args.dtype = args.dtype or "float32"
  args.bytes_per_elem = DTYPE_BYTES[args.dtype]


def variants_of(args) -> list[Variant]:
  """The parsed --strategies (parsed once, by check_args)."""
  if getattr(args, "variants", None) is None:
    args.variants = variants_lib.parse(args.strategies, timed=not args.analytic,
                                       tokens=args.tokens, d_model=args.hidden,
                                       num_experts=args.experts, top_k=args.topk)
  return args.variants


def check_routing(p: argparse.ArgumentParser, spec: str, tokens: int, top_k: int,
                  num_experts: int | None = None) -> None:
  """--routing parses; a file: routing is a readable [N*G, T, K] integer array; a
  trace: routing has the layer, --experts and --topk (tokens: once the mesh is known)."""
  try:
    kind, arg = synthetic.parse_routing(spec)
    if kind == "trace" and num_experts is not None:
      synthetic.check_trace(spec, num_experts=num_experts, top_k=top_k)
  except ValueError as e:
    p.error(str(e))
  if kind != "file":
    return
  if not os.path.isfile(arg):
    p.error(f"--routing={spec!r} is invalid: file {arg!r} does not exist")
  try:
    ids = np.load(arg, mmap_mode="r")
  except (OSError, EOFError, ValueError) as e:  # unreadable, empty, pickled, not .npy
    p.error(f"--routing={spec!r} is invalid: {arg!r} is not a readable .npy array ({e})")
  if ids.ndim != 3 or ids.shape[1:] != (tokens, top_k) or ids.dtype.kind not in "iu":
    p.error(f"--routing={spec!r} is invalid: {arg!r} holds {ids.dtype}{list(ids.shape)}; "
            f"expected integer ids of shape [N*G, --tokens={tokens}, --topk={top_k}]")


def routing(spec: str, **kwargs):
  """synthetic.routing; its ValueErrors are about the routing file (shape, ids)."""
  try:
    return synthetic.routing(spec, **kwargs)
  except ConfigError:  # a trace's errors name the flag already
    raise
  except ValueError as e:
    raise ConfigError(f"--routing={spec!r} is invalid: {e}") from None


def check_args(p: argparse.ArgumentParser, args) -> None:
  cli.check_topk(args.topk, args.experts)
  check_routing(p, args.routing, args.tokens, args.topk, args.experts)
  resolve_dtype(args)
  bases = [v.base for v in variants_of(args)]
  if args.analytic and (args.fit_profile or args.backward):
    p.error("--fit-profile and --backward need the timed mode (omit --analytic)")
  if args.fit_only and not args.fit_profile:
    p.error("--fit-only needs --fit-profile OUT.json")
  if args.tokens % min(args.gspmd_group, args.tokens) and "gspmd" in bases:
    p.error(f"--gspmd-group={args.gspmd_group} is invalid: must divide --tokens={args.tokens}")
  if args.analytic or not args.fit_profile:  # a fitted profile replaces --profile
    cli.check_profile(args.profile or "default")


def analytic(args, ids=None, profile: cost.CostProfile | None = None,
             auto_choice: str | None = None) -> dict:
  """Traffic, wire bytes and predicted ms of every variant (and auto's choice: the cost
  model's, or `auto_choice` when calibrated)."""
  resolve_dtype(args)
  nodes, local = args.mesh
  shape = MeshShape(nodes, local)
  if ids is None:
    ids = routing(args.routing, devices=nodes * local, tokens=args.tokens,
                  num_experts=args.experts, top_k=args.topk, seed=args.seed)
  if profile is None:
    profile = cost.load_profile(args.profile or "default")
  cache = {}

  def stats(base: str, chunks: int = 1) -> dict:
    if (base, chunks) not in cache:
      cache[base, chunks] = variants_lib.chunked_stats(
          ids, base, chunks, mesh_shape=(nodes, local), num_experts=args.experts,
          d_model=args.hidden, capacity_factor=args.capacity_factor)
    return cache[base, chunks]

  def entry(variant: Variant, base: str) -> dict:
    return variants_lib.variant_entry(stats(base, variant.chunks), variant, d_model=args.hidden,
                                      dtype=args.dtype, profile=profile, mesh_shape=shape)

  # auto: the candidate the model prices cheapest on this routing (as dispatch/auto.py)
  candidates = auto.candidates(shape, args.topk)
  auto_ms = {n: entry(Variant(n, n), n)["predicted_ms"] for n in candidates}
  choice = auto_choice or min(candidates, key=lambda n: (auto_ms[n], registry.names().index(n)))
  results = []
  for v in variants_of(args):
    if v.base == "auto":
      r = {**entry(Variant(choice, choice), choice), **v.to_json(), "auto_choice": choice,
           "auto_predicted_ms": auto_ms}
    else:  # gspmd sends what flat sends (one copy per (token, expert)), padded
      r = entry(v, "flat" if v.base == "gspmd" else v.base)
    results.append(r)
  flat = stats("flat")
  floor = traffic.inter_node_floor(ids, shape, args.experts)
  config = {"mesh": f"{nodes}x{local}", "experts": args.experts, "topk": args.topk,
            "tokens": args.tokens, "hidden": args.hidden, "routing": args.routing,
            "seed": args.seed, "capacity_factor": args.capacity_factor, "dtype": args.dtype,
            "bytes_per_elem": args.bytes_per_elem, "profile": args.profile or "default",
            "inter_node_floor_rows": floor}
  return {"config": config, "results": results,
          "flat_baseline": {"rows": flat["rows"], "max_rows_per_peer": flat["max_rows_per_peer"]},
          "hottest_link": variants_lib.hottest_link(results, flat),
          "auto": {"choice": choice, "predicted_ms": auto_ms}}


def table(report: dict, *, predicted: bool = True) -> str:
  """Traffic per variant; `predicted`: with the cost model's ms (analytic mode)."""
  results, cfg = report["results"], report["config"]
  flat = report["flat_baseline"]
  w = max(12, *(len(r["strategy"]) for r in results)) + 2
  pred_head = f"{'pred ms':>10}" if predicted else ""
  lines = [f"{'':<{w}}{'rows, all devices':>22}{'dispatch MB, all devices':>26}"
           f"{'max rows/peer':>20}",
           f"{'strategy':<{w}}{'inter':>11}{'intra':>11}{'inter':>13}{'intra':>13}"
           f"{'inter':>10}{'intra':>10}{'inter vs flat':>15}{'dropped':>9}{pred_head}"]
  for r in results:
    ratio = flat["rows"]["inter"] / max(r["rows"]["inter"], 1)
    pred = f"{r['predicted_ms']:>10.2f}" if predicted else ""
    lines.append(f"{r['strategy']:<{w}}{r['rows']['inter']:>11}{r['rows']['intra']:>11}"
                 f"{r['bytes']['inter'] / 1e6:>13.2f}{r['bytes']['intra'] / 1e6:>13.2f}"
                 f"{r['max_rows_per_peer']['inter']:>10}{r['max_rows_per_peer']['intra']:>10}"
                 f"{ratio:>14.2f}x{r['dropped']:>9}{pred}")
  lines.append(f"MB: dispatched rows on the wire, one direction, summed over devices, in "
               f"--dtype {cfg['dtype']}\n    or the variant's comm_dtype (fp8: D + 4 bytes per "
               "row); combine returns as many rows")
  if predicted:
    lines.append(f"pred ms: dispatch + combine of one layer by cost profile "
                 f"{cfg['profile']!r} (chunks priced one after another)")
  rates = results[0]["dedup_rate"]
  lines.append(f"dedup rate: node {rates['node']:.3f}, device {rates['device']:.3f}; "
               f"inter-node floor (once per token per remote node): "
               f"{cfg['inter_node_floor_rows']} rows")
  hot = report.get("hottest_link")
  if hot:
    lines.append(f"hottest link: {hot['strategy']} {hot['link']} max {hot['max_rows_per_peer']} "
                 f"rows/peer = {hot['vs_flat']:.1f}x flat's (max {hot['flat_max_rows_per_peer']})")
  if predicted:
    a = report["auto"]
    ms = ", ".join(f"{n} {t:.2f} ms" for n, t in a["predicted_ms"].items())
    lines.append(f"auto picks {a['choice']} ({ms})")
  return "\n".join(lines)


def timed_table(report: dict) -> str:
  results = report["results"]
  base = next((r for r in results if r["strategy"] == "flat"), None)
  labels = [f"auto:{r['auto_choice']}" if "auto_choice" in r else r["strategy"] for r in results]
  w = max(20, *map(len, labels)) + 2
  lines = [f"{'strategy':<{w}}{'hop caps':>14}{'min ms':>10}{'median ms':>11}{'max ms':>10}"
           f"{'vs flat':>9}{'predicted':>11}{'pred err':>10}"]
  for label, r in zip(labels, results):
    t = r["time_ms"]
    speed = f"{base['time_ms']['median'] / t['median']:>8.2f}x" if base else f"{'-':>9}"
    caps = "/".join(str(c) for c in (r["hop_capacity_by_strategy"][r["auto_choice"]]
                                     if "auto_choice" in r else r["hop_capacity"]))
    if r.get("overlap_chunks", 1) > 1:  # capacities per chunk
      caps = f"{r['overlap_chunks']}x {caps}"
    err = (r["predicted_ms"] - t["median"]) / t["median"]
    lines.append(f"{label:<{w}}{caps:>14}{t['min']:>10.1f}{t['median']:>11.1f}"
                 f"{t['max']:>10.1f}{speed}{r['predicted_ms']:>11.1f}{err:>+9.0%} ")
  return "\n".join(lines)


def _write_json(report: dict, path: str | None) -> None:
  if path == "-":
    json.dump(report, sys.stdout, indent=1)
    print()
  elif path:
    with open(path, "w") as f:
      json.dump(report, f, indent=1)


def timed(args) -> dict | None:
  """Runs the timed benchmark (and --fit-profile); returns the report on rank 0."""
  import jax

  from hiermoe_jax.bench import timed as timed_lib  # starts JAX; keep --analytic light
  mesh = timed_lib.start(args.mesh)
  shape = MeshShape.of(mesh)
  leader = timed_lib.is_leader()
  args.mesh = (shape.nodes, shape.local)
  cli.check_experts_fit(args.experts, shape.nodes, shape.local)
  resolve_dtype(args)
  variants = variants_of(args)
  ids = routing(args.routing, devices=shape.devices, tokens=args.tokens,
                num_experts=args.experts, top_k=args.topk, seed=args.seed)
  if args.capacity_factor is not None and leader:
    print("# note: timed mode uses tight dropless buffers; --capacity-factor only affects "
          "the analytic columns")

  fit_details = None
  if args.fit_profile:
    if args.fit_max_mb is not None:
      max_bytes = int(args.fit_max_mb * 1e6)
    else:
      max_bytes = max(_stage_bytes_of(timed_lib, ids, v, shape, args) for v in variants)
    profile, fit_details = timed_lib.fit_profile(
        mesh, d_model=args.hidden, dtype=args.dtype, max_bytes=max_bytes,
        points=args.fit_points, repeats=args.repeats, warmup=args.warmup, tokens=args.tokens,
        name=f"fitted on mesh {shape.nodes}x{shape.local}, {jax.process_count()} "
             f"process(es), D={args.hidden}, {args.dtype}")
    if leader:
      profile.save(args.fit_profile)
      print(f"# fitted profile -> {args.fit_profile}")
      for kind, d in fit_details.items():
        print(f"  {kind:<6} alpha {d['alpha_ms']:.3f} ms  beta {d['beta_ms_per_byte']:.3e} "
              f"ms/B ({1e-6 / max(d['beta_ms_per_byte'], 1e-30):.2f} GB/s)  r^2 "
              f"{d['r2']:.3f}")
  else:
    profile = cost.load_profile(args.profile or "default")
  calibration = None
  if (args.profile is None and not args.fit_profile and not args.fit_only
      and any(v.base == "auto" for v in variants)):
    calibration = calibrated_auto(timed_lib, mesh, ids, args)
    choice = calibration["choices"][0]
    variants = [Variant(v.spec, choice, v.fields) if v.base == "auto" else v for v in variants]
  # auto decided with the profile in use, or calibrated
  report = analytic(args, ids, profile, calibration and calibration["choices"][0])
  report["config"].update(mode="timed", repeats=args.repeats, warmup=args.warmup,
                          backward=args.backward, processes=jax.process_count(),
                          profile=args.fit_profile or args.profile or "default")
  if calibration is not None:
    report["auto"].update(mode="calibrated", calibration_ms=calibration["calibration_ms"],
                          calibration_times_ms=calibration["times_ms"][0])
  if fit_details is not None:
    report["fit"] = fit_details
    if args.fit_only:
      return report if leader else None

  info = timed_lib.benchmark(mesh, ids, strategies=variants, num_experts=args.experts,
                             d_model=args.hidden, dtype=args.dtype, repeats=args.repeats,
                             warmup=args.warmup, backward=args.backward,
                             gspmd_group=min(args.gspmd_group, args.tokens), seed=args.seed,
                             profile=profile)
  for v, r in zip(variants, report["results"]):
    r.update(info[v.spec])
    if "auto_choice" in r and calibration is not None:  # a plain program of the choice
      r.update(auto_mode="calibrated", calibration_ms=calibration["calibration_ms"],
               hop_capacity_by_strategy={r["auto_choice"]: r["hop_capacity"]})
    if v.base == "auto":
      priced, caps, chunks = r["auto_choice"], r["hop_capacity_by_strategy"][r["auto_choice"]], 1
      bpe = args.bytes_per_elem
    else:
      priced, caps, chunks = v.priced, r["hop_capacity"], v.chunks
      bpe = v.bytes_per_elem(args.hidden, args.dtype)
    r["predicted_ms"] = chunks * float(cost.predict(priced, caps, profile, mesh_shape=shape,
                                                    d_model=args.hidden, bytes_per_elem=bpe))
    if args.backward:  # the VJP repeats every all-to-all once more
      r["predicted_ms"] *= 2
  return report if leader else None


def calibrated_auto(timed_lib, mesh, ids, args) -> dict:
  """`auto` without --profile: times each candidate's dispatch + combine on this routing
  and mesh, interleaved (`calibrate.measure`, as the trainer's host-side auto) and
  takes the fastest. Returns the `calibrate.AutoTuner` decision record; its
  calibration_ms includes compiling the candidates."""
  t0 = time.perf_counter()
  shape = MeshShape.of(mesh)
  names = auto.candidates(shape, args.topk)
  x, slots, w = timed_lib.routed_inputs(ids, args.hidden, args.dtype, args.seed)
  inputs = [timed_lib.global_array(mesh, a) for a in (x, slots, w, x)]
  steps = {name: functools.partial(timed_lib.exchange_step(
      mesh, name, timed_lib.tight_hop_caps(ids, name, shape, args.experts), args.experts,
      args.backward), *inputs) for name in names}
  times = calibrate.measure(steps, repeats=args.repeats, warmup=args.warmup)
  tuner = calibrate.AutoTuner(layers=1, candidates=names)
  return tuner.decide(0, [times], reason="start",
                      calibration_ms=(time.perf_counter() - t0) * 1e3)


def _stage_bytes_of(timed_lib, ids, variant: Variant, shape, args) -> int:
  """The largest stage (bytes of one hop's buffer) the variant runs, in --dtype."""
  bpe = args.bytes_per_elem
  if variant.base == "gspmd":
    group = min(args.gspmd_group, args.tokens)
    cap = timed_lib.gspmd_capacity(ids, group, args.experts)
    return cost.stage_bytes(shape.devices, (args.experts // shape.devices)
                            * (args.tokens // group) * cap, args.hidden, bpe)
  names = (auto.candidates(shape, args.topk) if variant.base == "auto" else (variant.base,))
  return max(cost.stage_bytes(cost.group_size(kind, shape), c, args.hidden, bpe)
             for name in names
             for kind, c in zip(cost.stage_kinds(name),
                                timed_lib.tight_hop_caps(ids, name, shape, args.experts,
                                                         variant.chunks)))


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:  # ConfigError is bad input (some found only once the mesh is known), not a bug
    check_args(parser, args)
    if args.analytic:
      args.mesh = args.mesh or DEFAULT_MESH
    if args.mesh is not None:  # before JAX starts
      cli.check_experts_fit(args.experts, *args.mesh)
    report = analytic(args) if args.analytic else timed(args)
  except ConfigError as e:
    parser.error(str(e))
  if args.analytic:
    cfg = report["config"]
    print(f"# analytic traffic: mesh {cfg['mesh']}, E={cfg['experts']}, K={cfg['topk']}, "
          f"T={cfg['tokens']}/device, D={cfg['hidden']}, {cfg['dtype']}, routing "
          f"{cfg['routing']}")
    print(table(report))
    _write_json(report, args.json)
    return 0
  if report is None:  # not rank 0
    return 0
  cfg = report["config"]
  print(f"# timed dispatch+combine{' + VJP' if cfg['backward'] else ''}: mesh {cfg['mesh']} "
        f"({cfg['processes']} process(es)), E={cfg['experts']}, K={cfg['topk']}, "
        f"T={cfg['tokens']}/device, D={cfg['hidden']}, {cfg['dtype']}, routing "
        f"{cfg['routing']}, {cfg['repeats']} repeats; predicted by profile {cfg['profile']!r}")
  print(table(report, predicted=False))
  if "time_ms" in report["results"][0]:
    print(timed_table(report))
  if report["auto"].get("mode") == "calibrated":
    a = report["auto"]
    ms = ", ".join(f"{n} {t:.2f} ms" for n, t in a["calibration_times_ms"].items())
    print(f"auto calibrated on this mesh: {a['choice']} ({ms}) in "
          f"{a['calibration_ms']:.0f} ms (compilation included)")
  _write_json(report, args.json)
  return 0
