"""Trains the HierMoE transformer LM; resumes from the latest checkpoint in --run-dir.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python scripts/train.py --config configs/tiny.yaml --mesh 2x4 --run-dir runs/tiny

Every config key can be overridden with --set section.key=value (e.g. --set
train.lr=1e-3 --set moe.top_k=4); the flags below are shortcuts. Multi-host: the
same command under scripts/launch.py, SLURM or MPI (hiermoe_jax.cluster.distributed).

Exit codes: 0 done; 2 invalid config; 3 NaN/Inf loss or gradients with --on-nan stop
(the latest checkpoint is the last good one); 4 no checkpoint in --run-dir reads back;
128 + signal (143 SIGTERM, 130 SIGINT) when a signal stopped the run after saving a
checkpoint of the step it finished: rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import pathlib
import signal
import sys


def parse_args(argv=None):
  from hiermoe_jax.bench import cli  # one-line errors with exit code 2
  p = cli.ArgumentParser(description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/tiny.yaml", help="YAML preset")
  p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                 help="override a config key (repeatable)")
  p.add_argument("--steps", type=int, help="train.steps")
  p.add_argument("--run-dir", type=cli.output_dir,
                 help="checkpoints + metrics.jsonl (default runs/<config name>)")
  p.add_argument("--checkpoint-every", type=int, help="train.checkpoint_every (0 = at the end)")
  p.add_argument("--keep", type=int, help="train.keep: checkpoints kept")
  p.add_argument("--data", help="data.path: text file/directory, or tokens in .bin/.npy")
  p.add_argument("--dispatch", help="moe.dispatch: flat, flat_dedup, hier, hier_dedup or auto")
  p.add_argument("--capacity-factor", type=float, help="moe.capacity_factor")
  p.add_argument("--dropless", action="store_true", help="moe.dropless=true")
  p.add_argument("--swap-interval", type=int, help="train.swap_interval (0 = off)")
  p.add_argument("--mesh", type=cli.mesh_shape, metavar="NxG",
                 help="mesh.nodes x mesh.local, e.g. 2x4")
  p.add_argument("--on-nan", choices=("skip", "stop"),
                 help="train.on_nan: on a NaN/Inf loss or gradient, skip the update or stop")
  p.add_argument("--profile-steps", type=step_range, metavar="A:B",
                 help="write a jax.profiler trace (Perfetto/XProf) of steps A to B "
                      "(inclusive, 1 = the first) into RUN_DIR/profile")
  p.add_argument("--stop-after", type=cli.integer(1), help="exit after N steps without a final "
                 "checkpoint, as if killed (for resume tests)")
  return p.parse_args(argv)


def step_range(text: str) -> tuple[int, int]:
  """type= for A:B, steps 1 <= A <= B."""
  first, sep, last = text.strip().partition(":")
  if not (sep and first.isdecimal() and last.isdecimal() and 1 <= int(first) <= int(last)):
    raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected A:B with integers "
                                     "1 <= A <= B, e.g. 3:5")
  return int(first), int(last)


def overrides(args) -> list[str]:
  out = list(args.set)
  flags = {"train.steps": args.steps, "train.checkpoint_every": args.checkpoint_every,
           "train.keep": args.keep, "data.path": args.data, "moe.dispatch": args.dispatch,
           "moe.capacity_factor": args.capacity_factor, "train.swap_interval": args.swap_interval,
           "train.on_nan": args.on_nan}
  out += [f"{key}={value}" for key, value in flags.items() if value is not None]
  if args.dropless:
    out.append("moe.dropless=true")
  if args.mesh:  # (nodes, local) from cli.mesh_shape
    out += [f"mesh.nodes={args.mesh[0]}", f"mesh.local={args.mesh[1]}"]
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  from hiermoe_jax.cluster import distributed
  from models.checkpoint import CheckpointError
  from models.config import ConfigError, load_config
  from models.train_loop import NonFiniteError, run
  codes = {ConfigError: 2, NonFiniteError: 3, CheckpointError: 4}
  try:
    distributed.initialize()  # no-op in a single plain process
    cfg = load_config(args.config, overrides(args))
    run_dir = args.run_dir or f"runs/{pathlib.Path(args.config).stem}"
    result = run(cfg, run_dir, stop_after=args.stop_after, profile_steps=args.profile_steps)
  except tuple(codes) as e:
    print(f"error: {e}", file=sys.stderr)
    return next(code for cls, code in codes.items() if isinstance(e, cls))
  if result.interrupted:
    print(f"interrupted by {signal.Signals(result.interrupted).name}: rerun the same "
          "command to resume", file=sys.stderr)
    return 128 + result.interrupted
  if result.records:
    last = result.records[-1]
    print(f"done: step {last['step']} loss {last['loss']:.4f}"
          + (f" eval_loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""),
          file=sys.stderr)
  return 0
