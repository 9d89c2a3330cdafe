"""Identity vs DeepSeek EPLB vs expert-swap placements on a routing trace; see
hiermoe_jax/bench/placements.py and README."""

import sys

from hiermoe_jax.bench.placements import main

if __name__ == "__main__":
  sys.exit(main())
