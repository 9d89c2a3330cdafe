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

`permute_blocks` / `unpermute_blocks` are the same two operations on a buffer of P
equal blocks, one per all-to-all peer, with unit weights (the exchange hops on CPU
meshes). For `impl="xla"` they gather and scatter-add block by block, each the other's
VJP: XLA:CPU splits an all-to-all into per-peer operands, and the slices of a
concatenate of per-block gathers fold into the gathers, so a hop's buffer is written
once instead of gathered, then sliced (and received, concatenated, then scattered).
Autodiff of the blockwise forms would sum P full-size scatters, hence the custom VJPs.
Measurements: docs/design.md, section 4.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

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


def _block_ids(ids_S, blocks: int, limit: int):
  """Per block, its ids with padding (-1 or out of [0, limit)) sent to `limit`."""
  size = ids_S.shape[0] // blocks
  safe_S = jnp.where((ids_S >= 0) & (ids_S < limit), ids_S, limit)
  return [safe_S[b * size:(b + 1) * size] for b in range(blocks)]


def _gather_blocks(x_TD, src_S, blocks: int):
  rows = x_TD.astype(jnp.float32)  # exact; one f32 copy per call is fused into the gathers
  return jnp.concatenate([
      jnp.take(rows, ids, axis=0, mode="fill", fill_value=0)
      for ids in _block_ids(src_S, blocks, x_TD.shape[0])]).astype(x_TD.dtype)


def _scatter_add_blocks(buf_SD, dst_S, blocks: int, num_tokens: int):
  size = buf_SD.shape[0] // blocks
  y_TD = jnp.zeros((num_tokens, buf_SD.shape[1]), jnp.float32)
  for b, ids in enumerate(_block_ids(dst_S, blocks, num_tokens)):
    y_TD = y_TD.at[ids].add(buf_SD[b * size:(b + 1) * size].astype(jnp.float32), mode="drop")
  return y_TD.astype(buf_SD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _permute_blocks(x_TD, src_S, blocks):
  return _gather_blocks(x_TD, src_S, blocks)


def _permute_blocks_fwd(x_TD, src_S, blocks):
  return _gather_blocks(x_TD, src_S, blocks), (src_S, x_TD.shape[0])


def _permute_blocks_bwd(blocks, res, dbuf_SD):
  src_S, num_tokens = res
  return _scatter_add_blocks(dbuf_SD, src_S, blocks, num_tokens), None


_permute_blocks.defvjp(_permute_blocks_fwd, _permute_blocks_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _unpermute_blocks(buf_SD, dst_S, blocks, num_tokens):
  return _scatter_add_blocks(buf_SD, dst_S, blocks, num_tokens)


def _unpermute_blocks_fwd(buf_SD, dst_S, blocks, num_tokens):
  return _scatter_add_blocks(buf_SD, dst_S, blocks, num_tokens), dst_S


def _unpermute_blocks_bwd(blocks, num_tokens, dst_S, dy_TD):
  return _gather_blocks(dy_TD, dst_S, blocks), None


_unpermute_blocks.defvjp(_unpermute_blocks_fwd, _unpermute_blocks_bwd)


def _check_blocks(name: str, rows: int, blocks: int):
  if not isinstance(blocks, int) or blocks < 1 or rows % blocks:
    raise ValueError(f"{name}: blocks={blocks!r} is invalid: it must be a positive int "
                     f"dividing the buffer's {rows} rows")


def permute_blocks(x_TD, src_S, *, blocks: int, impl: str = "xla"):
  """`permute` of a buffer of `blocks` equal blocks (an all-to-all's peers)."""
  _check_impl(impl)
  _check_blocks("permute_blocks", src_S.shape[0], blocks)
  if impl == "pallas" or blocks == 1:
    return permute(x_TD, src_S, impl=impl)
  return _permute_blocks(x_TD, jnp.asarray(src_S, jnp.int32), blocks)


def unpermute_blocks(buf_SD, dst_S, *, blocks: int, num_tokens: int, impl: str = "xla"):
  """`unpermute` with unit weights of a buffer of `blocks` equal blocks."""
  _check_impl(impl)
  _check_blocks("unpermute_blocks", buf_SD.shape[0], blocks)
  if impl == "pallas" or blocks == 1:
    return unpermute(buf_SD, dst_S, jnp.ones(buf_SD.shape[:1], buf_SD.dtype),
                     num_tokens=num_tokens, impl=impl)
  return _unpermute_blocks(buf_SD, jnp.asarray(dst_S, jnp.int32), blocks, num_tokens)
