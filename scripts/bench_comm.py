"""Mesh-level communication benchmark; see hiermoe_jax/bench/comm.py and README."""

import sys

from hiermoe_jax.bench.comm import main

if __name__ == "__main__":
  sys.exit(main())
