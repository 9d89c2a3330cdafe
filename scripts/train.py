"""Trains the HierMoE transformer LM; resumes from the latest checkpoint in --run-dir.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python scripts/train.py --config configs/tiny.yaml --mesh 2x4 --run-dir runs/tiny

Every config key can be overridden with --set section.key=value (e.g. --set
train.lr=1e-3 --set moe.top_k=4); the flags below are shortcuts. Multi-host: the
same command under scripts/launch.py, SLURM or MPI (hiermoe_jax.distributed).
"""

from __future__ import annotations

import argparse
import pathlib
import sys


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/tiny.yaml", help="YAML preset")
  p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                 help="override a config key (repeatable)")
  p.add_argument("--steps", type=int, help="train.steps")
  p.add_argument("--run-dir", help="checkpoints + metrics.jsonl (default runs/<config name>)")
  p.add_argument("--checkpoint-every", type=int, help="train.checkpoint_every (0 = at the end)")
  p.add_argument("--keep", type=int, help="train.keep: checkpoints kept")
  p.add_argument("--data", help="data.path: text file/directory, or tokens in .bin/.npy")
  p.add_argument("--dispatch", help="moe.dispatch: flat, flat_dedup, hier, hier_dedup or auto")
  p.add_argument("--capacity-factor", type=float, help="moe.capacity_factor")
  p.add_argument("--dropless", action="store_true", help="moe.dropless=true")
  p.add_argument("--swap-interval", type=int, help="train.swap_interval (0 = off)")
  p.add_argument("--mesh", metavar="NxG", help="mesh.nodes x mesh.local, e.g. 2x4")
  p.add_argument("--stop-after", type=int, help="exit after N steps without a final "
                 "checkpoint, as if killed (for resume tests)")
  return p.parse_args(argv)


def overrides(args) -> list[str]:
  out = list(args.set)
  flags = {"train.steps": args.steps, "train.checkpoint_every": args.checkpoint_every,
           "train.keep": args.keep, "data.path": args.data, "moe.dispatch": args.dispatch,
           "moe.capacity_factor": args.capacity_factor, "train.swap_interval": args.swap_interval}
  out += [f"{key}={value}" for key, value in flags.items() if value is not None]
  if args.dropless:
    out.append("moe.dropless=true")
  if args.mesh:
    nodes, sep, local = args.mesh.lower().partition("x")
    if not (sep and nodes.isdigit() and local.isdigit()):
      raise SystemExit(f"error: --mesh={args.mesh!r} is invalid: expected NxG, e.g. 2x4")
    out += [f"mesh.nodes={nodes}", f"mesh.local={local}"]
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  from hiermoe_jax import distributed
  distributed.initialize()  # no-op in a single plain process

  from models.config import ConfigError, load_config
  from models.train_loop import run
  try:
    cfg = load_config(args.config, overrides(args))
    run_dir = args.run_dir or f"runs/{pathlib.Path(args.config).stem}"
    result = run(cfg, run_dir, stop_after=args.stop_after)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if result.records:
    last = result.records[-1]
    print(f"done: step {last['step']} loss {last['loss']:.4f}"
          + (f" eval_loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""),
          file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
