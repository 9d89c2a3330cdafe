"""Benchmark: XLA reference vs Pallas permute / unpermute.

Legend: T tokens, K top-k, S = T * K slots (rows of the permuted buffer), D model dim.
The 'xla' rows run the `*_reference` functions, which are `hiermoe_jax.permute`'s XLA
implementation (same contract as the kernels). Throughput is the algorithmic minimum traffic
(bytes read + bytes written, the int32 index / weight vectors included, sort scratch excluded)
over the median wall time. On CPU the Pallas kernels run in interpret mode, so those numbers say
nothing about GPU performance.

  python scripts/bench_kernels.py --sizes 1024x256,4096x1024 --dtype bfloat16 \
      --repeats 5 --json /tmp/bench.json [--peak-gbps 3350]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

from hiermoe_jax.bench import cli
from pallas_kernels import permute, permute_reference, unpermute, unpermute_reference


@dataclasses.dataclass
class Result:
  op: str
  impl: str
  tokens: int
  rows: int
  d: int
  dtype: str
  median_s: float
  gbps: float
  peak_fraction: float | None


def parse_sizes(text: str) -> list[tuple[int, int]]:
  sizes = []
  for item in text.split(","):
    t, sep, d = item.strip().lower().partition("x")
    if not (sep and t.isdecimal() and d.isdecimal() and int(t) >= 1 and int(d) >= 1):
      raise argparse.ArgumentTypeError(
          f"{text!r} is invalid: size {item!r} must be TxD with T, D >= 1, e.g. 4096x1024")
    sizes.append((int(t), int(d)))
  return sizes


def median_time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up outside the timing
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def make_inputs(t: int, d: int, top_k: int, dtype, seed: int = 0):
  """MoE-like routing: every token appears top_k times in a random row order."""
  kx, kp, kw = jax.random.split(jax.random.key(seed), 3)
  x_TD = jax.random.normal(kx, (t, d), dtype)
  idx_S = (jax.random.permutation(kp, t * top_k) // top_k).astype(jnp.int32)
  w_S = jax.random.uniform(kw, (t * top_k,), jnp.float32)
  return x_TD, idx_S, w_S


def bench_size(t, d, *, dtype, top_k, repeats, interpret, peak_gbps) -> list[Result]:
  x_TD, idx_S, w_S = make_inputs(t, d, top_k, dtype)
  s = idx_S.shape[0]
  item = jnp.dtype(dtype).itemsize
  buf_SD = permute_reference(x_TD, idx_S)
  permute_bytes = s * 4 + 2 * s * d * item  # idx + gathered rows read + rows written
  unpermute_bytes = s * 8 + s * d * item + t * d * item  # idx, w, rows read, tokens written
  cases = [
      ("permute", "xla", jax.jit(permute_reference), (x_TD, idx_S), permute_bytes),
      ("permute", "pallas", jax.jit(functools.partial(permute, interpret=interpret)),
       (x_TD, idx_S), permute_bytes),
      ("unpermute", "xla", jax.jit(functools.partial(unpermute_reference, num_tokens=t)),
       (buf_SD, idx_S, w_S), unpermute_bytes),
      ("unpermute", "pallas",
       jax.jit(functools.partial(unpermute, num_tokens=t, interpret=interpret)),
       (buf_SD, idx_S, w_S), unpermute_bytes),
  ]
  results = []
  for op, impl, fn, args, nbytes in cases:
    sec = median_time(fn, *args, repeats=repeats)
    gbps = nbytes / sec / 1e9
    frac = gbps / peak_gbps if peak_gbps and jax.default_backend() == "gpu" else None
    results.append(Result(op, impl, t, s, d, jnp.dtype(dtype).name, sec, gbps, frac))
  return results


def format_table(results: list[Result]) -> str:
  head = (f"{'op':<10}{'impl':<8}{'T':>7}{'S':>7}{'D':>6}{'dtype':>10}"
          f"{'median ms':>12}{'GB/s':>10}{'% peak':>8}")
  lines = [head, "-" * len(head)]
  for res in results:
    frac = f"{100 * res.peak_fraction:.1f}" if res.peak_fraction is not None else "n/a"
    lines.append(
        f"{res.op:<10}{res.impl:<8}{res.tokens:>7}{res.rows:>7}{res.d:>6}{res.dtype:>10}"
        f"{1e3 * res.median_s:>12.3f}{res.gbps:>10.3f}{frac:>8}"
    )
  return "\n".join(lines)


def main(argv=None) -> list[Result]:
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("1024x256,4096x1024"),
                      help="comma-separated TxD list (default: %(default)s)")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
  parser.add_argument("--top-k", type=cli.integer(1), default=2,
                      help="slots per token, S = T * K")
  parser.add_argument("--repeats", type=cli.integer(1), default=5)
  parser.add_argument("--peak-gbps", type=cli.real(0, strict=True), default=None,
                      help="device memory bandwidth in GB/s, for the %% of peak column (GPU)")
  parser.add_argument("--json", type=cli.output_file, default=None,
                      help="also write results here")
  args = parser.parse_args(argv)

  backend = jax.default_backend()
  interpret = backend != "gpu"
  print(f"backend={backend} device={jax.devices()[0].device_kind} pallas_interpret={interpret}")
  if interpret:
    print(f"NOTE: on {backend} the 'pallas' rows run the Pallas INTERPRETER and the 'xla' rows "
          f"run XLA:{backend.upper()}. These are NOT GPU numbers and say nothing about "
          "kernel performance on a GPU.")
  elif args.peak_gbps is None:
    print("(pass --peak-gbps to get the fraction of device memory bandwidth)")

  results = []
  for t, d in args.sizes:
    results += bench_size(t, d, dtype=jnp.dtype(args.dtype), top_k=args.top_k,
                          repeats=args.repeats, interpret=interpret, peak_gbps=args.peak_gbps)
  print(format_table(results))
  if args.json is not None:
    payload = {"backend": backend, "device": jax.devices()[0].device_kind,
               "pallas_interpret": interpret,
               "results": [dataclasses.asdict(r) for r in results]}
    pathlib.Path(args.json).write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.json}")
  return results
