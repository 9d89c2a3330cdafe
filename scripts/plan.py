"""Compiles the train step for a GPU cluster on this machine (no GPU): memory, compile time
and collectives; exit 1 if it does not fit. Options and JSON: --help, or models/plan.py.

  python scripts/plan.py --config configs/qwen3_30b_a3b.yaml --gpu h200 --mesh 4x8 --json plan.json
"""

import sys

from models.plan import main

if __name__ == "__main__":
  sys.exit(main())
