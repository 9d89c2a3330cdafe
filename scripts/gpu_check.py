"""Checks on a real GPU (about 5 minutes): Pallas kernels, ragged MoE paths, 20 training steps.

  make gpu-check        # or: python scripts/gpu_check.py --json gpu_check.json

Kernel numerics against the references and bandwidth against XLA's gather / scatter-add;
moe_apply's ragged_dot and ragged all-to-all paths against the padded one on the GPUs present;
configs/tiny.yaml for 20 steps. Prints a table, writes one JSON, exits 1 if a check fails or
there is no GPU. The logic lives in hiermoe_jax/bench/gpu_check.py.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

from hiermoe_jax.bench import cli, gpu_check  # noqa: E402


def parse_dims(text: str) -> list[int]:
  parts = text.split(",")
  if not all(p.strip().isdecimal() and int(p) >= 1 for p in parts):
    raise argparse.ArgumentTypeError(
        f"{text!r} is invalid: expected comma-separated integers >= 1, e.g. 2048,7168")
  return [int(p) for p in parts]


def main(argv=None) -> int:
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", type=cli.output_file, default="gpu_check.json",
                      help="results file (default: %(default)s)")
  parser.add_argument("--tokens", type=cli.integer(1), default=16384,
                      help="kernel check: tokens T (S = T * top_k rows)")
  parser.add_argument("--dims", type=parse_dims, default=[2048, 7168],
                      help="kernel check: model dims D (default: 2048,7168)")
  parser.add_argument("--top-k", type=cli.integer(1), default=8)
  parser.add_argument("--repeats", type=cli.integer(1), default=10, help="timed runs")
  parser.add_argument("--moe-tokens", type=cli.integer(1), default=2048,
                      help="moe check: tokens per device")
  parser.add_argument("--train-steps", type=cli.integer(2), default=20)
  parser.add_argument("--peak-gbps", type=cli.real(0, strict=True), default=None,
                      help="device memory bandwidth in GB/s for the %%peak column (default: "
                      "hiermoe_jax.gpu_aot's figure when the device is one of its GPUs)")
  args = parser.parse_args(argv)
  try:
    report = gpu_check.run(tokens=args.tokens, dims=args.dims, top_k=args.top_k,
                           repeats=args.repeats, train_steps=args.train_steps,
                           moe_tokens=args.moe_tokens, peak_gbps=args.peak_gbps)
  except gpu_check.NoGpu as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(gpu_check.format_table(report))
  pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {args.json}")
  return 0 if report["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
