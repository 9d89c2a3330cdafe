"""Plots a run's metrics.jsonl as PNGs: loss, throughput and imbalance.

  python scripts/plot_metrics.py RUN_DIR [--out DIR]

Needs matplotlib (the optional `plot` extra: pip install "hiermoe-jax[plot]").
"""

import sys

from models.plot_metrics import main

if __name__ == "__main__":
  sys.exit(main())
