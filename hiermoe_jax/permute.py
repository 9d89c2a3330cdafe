"""Local token permutation: the gathers and scatter-adds around each exchange.

Legend: T tokens (rows of the token-major array), S slots (rows of the permuted buffer),
D model dim.

`permute(x_TD, src_S)`: buf[s] = x[src[s]], zero where src[s] is -1 (or out of range).
`unpermute(buf_SD, dst_S, w_S, num_tokens=T)`: y[t] = sum over s with dst[s] == t of w[s] * buf[s].

Both implementations follow one contract, stated in `pallas_kernels.permute` (index
convention; float32 products and sums, one rounding per result): `impl="xla"` runs its
pure-jnp `*_reference` functions (XLA gather / scatter-add, differentiated by autodiff),
`impl="pallas"` its kernels. Sharing the reference code keeps the XLA path from drifting off
the contract the kernels are tested against.
"""

from __future__ import annotations

import pallas_kernels

IMPLS = ("xla", "pallas")


def _check_impl(impl: str):
  if impl not in IMPLS:
    raise ValueError(f"{impl=} is not one of {IMPLS}")


def permute(x_TD, src_S, *, impl: str = "xla"):
  """Gathers rows: [T, D] -> [S, D]; padding slots (-1 or out of range) are zeros."""
  _check_impl(impl)
  if impl == "pallas":
    return pallas_kernels.permute(x_TD, src_S)
  return pallas_kernels.permute_reference(x_TD, src_S)


def unpermute(buf_SD, dst_S, w_S, *, num_tokens: int, impl: str = "xla"):
  """Weighted scatter-add: [S, D] -> [num_tokens, D], in float32, cast to `buf`'s dtype."""
  _check_impl(impl)
  if impl == "pallas":
    return pallas_kernels.unpermute(buf_SD, dst_S, w_S, num_tokens=num_tokens)
  return pallas_kernels.unpermute_reference(buf_SD, dst_S, w_S, num_tokens=num_tokens)
