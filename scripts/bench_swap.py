"""Expert-swap benchmark; see hiermoe_jax/bench/swap.py and README."""

import sys

from hiermoe_jax.bench.swap import main

if __name__ == "__main__":
  sys.exit(main())
