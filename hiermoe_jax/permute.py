"""Local token permutation: the gathers and scatter-adds around each exchange.

`permute(x_TD, src_R)`: row r of the result is x[src[r]], zero where src[r] == -1.
`unpermute(buf_RD, dst_R, w_R, num_tokens)`: y[t] = sum_{r: dst[r] == t} w[r] * buf[r].
Both are linear, so autodiff gives their exact transposes. `impl="pallas"` runs
the kernels in `pallas_kernels/` instead of XLA's gather / scatter.
"""

from __future__ import annotations

import jax.numpy as jnp


def permute(x_TD, src_R, *, impl: str = "xla"):
  if impl == "pallas":
    import pallas_kernels
    return pallas_kernels.permute(x_TD, src_R)
  valid_R = src_R >= 0
  rows_RD = jnp.take(x_TD, jnp.where(valid_R, src_R, 0), axis=0)
  return jnp.where(valid_R[:, None], rows_RD, jnp.zeros((), x_TD.dtype))


def unpermute(buf_RD, dst_R, w_R, *, num_tokens: int, impl: str = "xla"):
  if impl == "pallas":
    import pallas_kernels
    return pallas_kernels.unpermute(buf_RD, dst_R, w_R, num_tokens=num_tokens)
  contrib_RD = buf_RD * w_R[:, None].astype(buf_RD.dtype)
  # Padding rows (dst == -1) are sent out of range and dropped by the scatter.
  dst_R = jnp.where(dst_R >= 0, dst_R, num_tokens)
  out = jnp.zeros((num_tokens, buf_RD.shape[-1]), jnp.float32)
  return out.at[dst_R].add(contrib_RD.astype(jnp.float32), mode="drop").astype(buf_RD.dtype)
