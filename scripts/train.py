"""Trains the HierMoE transformer LM; resumes from the latest checkpoint in --run-dir.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python scripts/train.py --config configs/tiny.yaml --mesh 2x4 --run-dir runs/tiny

Every config key can be overridden with --set section.key=value (e.g. --set
train.lr=1e-3 --set moe.top_k=4). Flags, exit codes and resuming: --help, or
models/cli.py, which holds the command line (importable by tests).
"""

import sys

from models.cli import main

if __name__ == "__main__":
  sys.exit(main())
