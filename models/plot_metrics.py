"""Plots a run's metrics.jsonl as PNGs: loss, throughput and imbalance.

  python scripts/plot_metrics.py RUN_DIR [--out DIR]

Needs matplotlib (the optional `plot` extra: pip install "hiermoe-jax[plot]").
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from hiermoe_jax.bench import cli
from models.metrics import read_metrics


def series(records, key):
  """(steps, values) of the records that carry `key`; per-layer lists are averaged."""
  steps, values = [], []
  for r in records:
    value = r.get(key)
    if value is None:
      continue
    if isinstance(value, list):
      if not value:
        continue
      value = sum(value) / len(value)
    steps.append(r["step"])
    values.append(value)
  return steps, values


def plot(run_dir: pathlib.Path, out_dir: pathlib.Path, records=None) -> list[pathlib.Path]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = read_metrics(run_dir) if records is None else records
  out_dir.mkdir(parents=True, exist_ok=True)
  figures = {
      "loss": [("loss", "train loss"), ("eval_loss", "eval loss")],
      "throughput": [("tokens_per_s", "tokens / s")],
      "imbalance": [("imbalance", "max / mean rows per device (mean over MoE layers)")],
  }
  written = []
  for name, lines in figures.items():
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in lines:
      steps, values = series(records[1:] if key == "tokens_per_s" else records, key)
      if steps:
        ax.plot(steps, values, marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_title(f"{name}: {run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    path = out_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
  return written


def main(argv=None) -> int:
  p = cli.ArgumentParser(description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("run_dir", type=pathlib.Path)
  p.add_argument("--out", type=cli.output_dir, help="output directory (default RUN_DIR/plots)")
  args = p.parse_args(argv)
  if not (args.run_dir / "metrics.jsonl").is_file():
    print(f"error: {args.run_dir / 'metrics.jsonl'} does not exist", file=sys.stderr)
    return 2
  try:
    records = read_metrics(args.run_dir)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    print(f"error: {args.run_dir / 'metrics.jsonl'} is not JSON lines ({e})", file=sys.stderr)
    return 2
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    print("error: plotting needs matplotlib, which is not installed; "
          'pip install "hiermoe-jax[plot]" (or pip install matplotlib)', file=sys.stderr)
    return 3
  out = pathlib.Path(args.out) if args.out else args.run_dir / "plots"
  for path in plot(args.run_dir, out, records):
    print(path)
  return 0
