"""Benchmark (hiermoe_jax/bench/kernels.py): XLA reference vs Pallas permute / unpermute.

Legend: T tokens, K top-k, S = T * K slots (rows of the permuted buffer), D model dim.
The 'xla' rows run the `*_reference` functions, which are `hiermoe_jax.permute`'s XLA
implementation (same contract as the kernels). Throughput is the algorithmic minimum traffic
(bytes read + bytes written, the int32 index / weight vectors included, sort scratch excluded)
over the median wall time. On CPU the Pallas kernels run in interpret mode, so those numbers say
nothing about GPU performance.

  python scripts/bench_kernels.py --sizes 1024x256,4096x1024 --dtype bfloat16 \
      --repeats 5 --json /tmp/bench.json [--peak-gbps 3350]
"""

from hiermoe_jax.bench.kernels import main

if __name__ == "__main__":
  main()
