"""Pallas permute / unpermute kernels vs XLA; see hiermoe_jax/bench/kernels.py and README.

  python scripts/bench_kernels.py --sizes 1024x256,4096x1024 --dtype bfloat16 --repeats 5
"""

from hiermoe_jax.bench.kernels import main

if __name__ == "__main__":
  main()
