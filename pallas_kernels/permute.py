"""Pallas token-permutation kernels for MoE dispatch (permute) and combine (unpermute).

Shape legend (used as suffixes in names, e.g. ``x_TD``, ``buf_RD``):
  T  tokens (rows of the token-major activations ``x_TD`` / ``y_TD``)
  R  rows of the permuted buffer ``buf_RD`` (e.g. expert-major slots, T * top_k)
  D  model dimension

``permute``   buf_RD[r] = x_TD[src_idx_R[r]]                      (row gather)
``unpermute`` y_TD[t]   = sum_{r : dst_idx_R[r] == t} w_R[r] * buf_RD[r]  (scatter-add)

Index convention, shared by the kernels, their VJPs and the references:
  * ``-1`` marks a padding row. Any other id outside the valid range (``[0, T)``
    for ``src_idx``, ``[0, num_tokens)`` for ``dst_idx``) is ALSO treated as
    padding instead of being wrapped or clamped: a padding row of ``permute``
    is all zeros, and a padding row of ``unpermute`` contributes nothing (and
    receives zero gradient).
  * Several rows may name the same token: ``permute`` copies it several times,
    ``unpermute`` sums them (this is how top-k > 1 routing is combined).

GPU backend: Triton (the default Pallas GPU lowering), not Mosaic GPU. All
three kernels are data-dependent row gathers; Triton expresses "load these 16
rows at these runtime addresses, masked" directly as one vectorised pointer
load with no explicit shared-memory staging, and it runs on Ampere as well as
Hopper (and ROCm). Mosaic GPU targets Hopper/Blackwell only, and its strength,
TMA bulk copies of dense tiles, does not help a per-row gather.

Kernels (see ``_group_rows_by_token`` for why unpermute is a gather):
  permute        grid (R blocks, D blocks)  tile = x[src[rows], cols]
  unpermute      grid (T blocks, D blocks)  tile = sum_k w * buf[k-th row of each token]
  unpermute_bwd  grid (R blocks, D blocks)  dbuf = w * dy[dst], partial dw dots
The VJP of permute is unpermute with unit weights.

Block sizes live in one frozen ``PermuteConfig``. Tails are handled by masking
inside the kernels, so no dimension has to be divisible by a block size and no
input is padded (padding would cost a full extra copy of ``x`` or ``buf``).
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = [
    "PermuteConfig",
    "permute",
    "unpermute",
    "permute_reference",
    "unpermute_reference",
]

_ACC_DTYPE = jnp.float32  # unpermute sums and weight gradients accumulate in f32


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class PermuteConfig:
    """Static tiling of the permutation kernels (hashable; safe as a jit static arg).

    Attributes:
      block_rows: output rows handled by one program: rows of ``buf`` for
        ``permute`` and for the ``unpermute`` backward kernel, tokens of ``y``
        for ``unpermute``.
      block_d: columns of the model dimension handled per program. 256 bf16
        columns = 512 contiguous bytes per gathered row, enough for fully
        coalesced 128-byte transactions.
      num_warps: Triton warps per program. A 16 x 256 f32 accumulator is 32
        registers per thread at 4 warps, leaving room for the loaded tile.

    Triton tensors must have power-of-two sizes, so both block sizes must be
    powers of two. They need NOT divide the array sizes (tails are masked), and
    they are clipped to the next power of two above the actual size so tiny
    inputs do not launch mostly-masked tiles.
    """

    block_rows: int = 16
    block_d: int = 256
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block_rows", "block_d", "num_warps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"PermuteConfig.{name} must be an int, got {value!r}")
            if not _is_power_of_two(value):
                raise ValueError(
                    f"PermuteConfig.{name}={value} must be a positive power of two "
                    "(Triton block and warp counts are powers of two)"
                )

    def tile(self, rows: int, d: int) -> tuple[int, int]:
        """Effective (block_rows, block_d) for an output of ``rows`` x ``d``."""
        return (
            min(self.block_rows, pl.next_power_of_2(max(rows, 1))),
            min(self.block_d, pl.next_power_of_2(max(d, 1))),
        )


DEFAULT_CONFIG = PermuteConfig()


# --------------------------------------------------------------------------
# Argument validation (shared by kernels and references so both agree).
# --------------------------------------------------------------------------


def _check_activations(name: str, a) -> jax.Array:
    a = jnp.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {a.dtype}")
    return a


def _check_index(name: str, idx, length_name: str | None = None, length: int | None = None):
    idx = jnp.asarray(idx)
    if idx.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {idx.shape}")
    if idx.dtype != jnp.int32:
        raise TypeError(f"{name} must have dtype int32, got {idx.dtype}")
    if length is not None and idx.shape[0] != length:
        raise ValueError(
            f"{name} has length {idx.shape[0]} but {length_name} has {length} rows; "
            "they must match"
        )
    return idx


def _check_static_int(name: str, value, lo: int, hi: int | None = None) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a static Python int, got {value!r}") from None
    if value < lo or (hi is not None and value > hi):
        valid = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}={value} is out of range; valid: {valid}")
    return value


def _check_permute_args(x_TD, src_idx_R, num_rows):
    x_TD = _check_activations("x", x_TD)
    src_idx_R = _check_index("src_idx", src_idx_R)
    if num_rows is not None:
        n = _check_static_int("num_rows", num_rows, 0, src_idx_R.shape[0])
        src_idx_R = src_idx_R[:n]
    return x_TD, src_idx_R


def _check_unpermute_args(buf_RD, dst_idx_R, weights_R, num_tokens):
    buf_RD = _check_activations("buf", buf_RD)
    num_rows = buf_RD.shape[0]
    dst_idx_R = _check_index("dst_idx", dst_idx_R, "buf", num_rows)
    weights_R = jnp.asarray(weights_R)
    if weights_R.ndim != 1:
        raise ValueError(f"weights must be 1-D, got shape {weights_R.shape}")
    if not jnp.issubdtype(weights_R.dtype, jnp.floating):
        raise TypeError(f"weights must have a floating dtype, got {weights_R.dtype}")
    if weights_R.shape[0] != num_rows:
        raise ValueError(
            f"weights has length {weights_R.shape[0]} but buf has {num_rows} rows; "
            "they must match"
        )
    num_tokens = _check_static_int("num_tokens", num_tokens, 0)
    return buf_RD, dst_idx_R, weights_R, num_tokens


def _resolve(interpret, config):
    if interpret is None:
        # The kernels lower through Triton, i.e. only on GPU; everywhere else
        # (CPU in particular) run them with the Pallas interpreter.
        interpret = jax.default_backend() != "gpu"
    elif not isinstance(interpret, bool):
        raise TypeError(f"interpret must be None, True or False, got {interpret!r}")
    if config is None:
        config = DEFAULT_CONFIG
    elif not isinstance(config, PermuteConfig):
        raise TypeError(f"config must be a PermuteConfig or None, got {type(config).__name__}")
    return interpret, config


# --------------------------------------------------------------------------
# References (pure jnp; differentiated by JAX autodiff in the tests).
# --------------------------------------------------------------------------


def permute_reference(x_TD, src_idx_R, *, num_rows=None):
    """Pure-jnp ``permute`` (same arguments and index convention; f32 VJP accumulation)."""
    x_TD, src_idx_R = _check_permute_args(x_TD, src_idx_R, num_rows)
    num_tokens, d = x_TD.shape
    if num_tokens == 0:  # every id is padding; jnp.take refuses an empty axis
        return jnp.zeros((src_idx_R.shape[0], d), x_TD.dtype)
    valid_R = (src_idx_R >= 0) & (src_idx_R < num_tokens)
    # Route padding to the out-of-bounds id T so mode="fill" zeroes it
    # (a raw -1 would wrap around to the last token).
    safe_R = jnp.where(valid_R, src_idx_R, num_tokens)
    # Gathering an f32 copy is exact, and makes autodiff's transpose (the
    # scatter-add of the cotangent) accumulate in f32, like the kernel's VJP.
    buf_RD = jnp.take(x_TD.astype(_ACC_DTYPE), safe_R, axis=0, mode="fill", fill_value=0)
    return buf_RD.astype(x_TD.dtype)


def unpermute_reference(buf_RD, dst_idx_R, weights_R, *, num_tokens):
    """Pure-jnp ``unpermute`` (same arguments and index convention)."""
    buf_RD, dst_idx_R, weights_R, num_tokens = _check_unpermute_args(
        buf_RD, dst_idx_R, weights_R, num_tokens
    )
    valid_R = (dst_idx_R >= 0) & (dst_idx_R < num_tokens)
    safe_R = jnp.where(valid_R, dst_idx_R, num_tokens)  # dropped by mode="drop"
    contrib_RD = weights_R.astype(_ACC_DTYPE)[:, None] * buf_RD.astype(_ACC_DTYPE)
    y_TD = jnp.zeros((num_tokens, buf_RD.shape[1]), _ACC_DTYPE)
    y_TD = y_TD.at[safe_R].add(contrib_RD, mode="drop")
    return y_TD.astype(buf_RD.dtype)


# --------------------------------------------------------------------------
# Kernels. Gathered inputs (x, buf, dy) and the small index vectors are whole
# arrays in global memory: which rows a program reads is data dependent, so
# those accesses are explicit masked gathers (masked-off lanes issue no memory
# traffic on GPU; their indices are clamped to 0 so the interpreter's gathers
# stay in bounds). Everything else is a BlockSpec tile (``*_blk`` refs), so
# the interpreter copies one tile per grid step instead of the whole array.
# Triton does not mask partial edge tiles, hence the row/column masks on every
# tile load and store.
# --------------------------------------------------------------------------


def _load_vec(ref_N, idx, mask, other):
    return plgpu.load(ref_N.at[jnp.where(mask, idx, 0)], mask=mask, other=other)


def _load_tile(ref_ND, rows, row_ok, cols, col_ok):
    """Gathers ref[rows, cols] as a [rows, cols] tile; zeros where masked."""
    safe_rows = jnp.where(row_ok, rows, 0)[:, None]
    safe_cols = jnp.where(col_ok, cols, 0)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    return plgpu.load(ref_ND.at[safe_rows, safe_cols], mask=mask, other=0)


def _store_tile(blk, value, row_ok, col_ok):
    # Whole-tile store: no clamped indices here, since duplicate (clamped)
    # indices in a masked store would race with the real writes in interpret mode.
    plgpu.store(blk, value.astype(blk.dtype), mask=row_ok[:, None] & col_ok[None, :])


def _iota(n: int):
    return jnp.arange(n, dtype=jnp.int32)


def _block_iota(axis: int, block: int):
    """Global indices covered by this program's block along grid axis ``axis``."""
    return pl.program_id(axis) * block + _iota(block)


def _permute_kernel(src_ref_R, x_ref_TD, out_blk, *, num_rows, block_rows, block_d):
    """Grid (row blocks, D blocks): out[rows, cols] = x[src[rows], cols]."""
    num_tokens, d = x_ref_TD.shape
    rows = _block_iota(0, block_rows)
    cols = _block_iota(1, block_d)
    row_ok, col_ok = rows < num_rows, cols < d
    src = _load_vec(src_ref_R, rows, row_ok, other=-1)
    valid = row_ok & (src >= 0) & (src < num_tokens)
    tile = _load_tile(x_ref_TD, src, valid, cols, col_ok)  # zeros on padding
    _store_tile(out_blk, tile, row_ok, col_ok)


def _unpermute_kernel(
    start_ref_T, count_ref_T, order_ref_R, w_sorted_ref_R, buf_ref_RD, y_blk,
    *, num_tokens, block_rows, block_d,
):
    """Grid (token blocks, D blocks): weighted gather-sum over each token's rows.

    Token t owns rows order[start[t] : start[t] + count[t]]. Step k of the loop
    gathers the k-th row of every token in the block at once; the trip count is
    the block's largest fan-in (top_k for regular MoE routing).
    """
    d = buf_ref_RD.shape[1]
    toks = _block_iota(0, block_rows)
    cols = _block_iota(1, block_d)
    tok_ok, col_ok = toks < num_tokens, cols < d
    start = _load_vec(start_ref_T, toks, tok_ok, other=0)
    count = _load_vec(count_ref_T, toks, tok_ok, other=0)

    def body(k, acc):
        has_row = k < count
        pos = start + k
        rows = _load_vec(order_ref_R, pos, has_row, other=0)
        w = _load_vec(w_sorted_ref_R, pos, has_row, other=0).astype(_ACC_DTYPE)
        tile = _load_tile(buf_ref_RD, rows, has_row, cols, col_ok).astype(_ACC_DTYPE)
        return acc + w[:, None] * tile

    acc = jax.lax.fori_loop(
        0, jnp.max(count), body, jnp.zeros((block_rows, block_d), _ACC_DTYPE)
    )
    _store_tile(y_blk, acc, tok_ok, col_ok)


def _unpermute_bwd_kernel(
    dst_ref_R, w_ref_R, dy_ref_TD, buf_blk, dbuf_blk, dw_part_blk,
    *, num_rows, block_rows, block_d,
):
    """Grid (row blocks, D blocks): dbuf[r] = w[r] * dy[dst[r]] and the partial
    dot <buf[r], dy[dst[r]]> over this D block (summed over blocks outside).

    Both cotangents need the same gathered dy tile, so one kernel reads dy and
    buf once instead of materialising the gathered dy and re-reading it.
    """
    num_tokens, d = dy_ref_TD.shape
    rows = _block_iota(0, block_rows)
    cols = _block_iota(1, block_d)
    row_ok, col_ok = rows < num_rows, cols < d
    dst = _load_vec(dst_ref_R, rows, row_ok, other=-1)
    valid = row_ok & (dst >= 0) & (dst < num_tokens)
    w = _load_vec(w_ref_R, rows, row_ok, other=0).astype(_ACC_DTYPE)
    g = _load_tile(dy_ref_TD, dst, valid, cols, col_ok).astype(_ACC_DTYPE)
    mask = row_ok[:, None] & col_ok[None, :]
    b = plgpu.load(buf_blk, mask=mask, other=0).astype(_ACC_DTYPE)
    _store_tile(dbuf_blk, w[:, None] * g, row_ok, col_ok)
    plgpu.store(dw_part_blk, jnp.sum(g * b, axis=1), mask=row_ok)


# --------------------------------------------------------------------------
# pallas_call wrappers (arguments already validated).
# --------------------------------------------------------------------------


_WHOLE = pl.no_block_spec  # the kernel sees the whole array and indexes it itself


def _pallas(kernel, name, out_shape, *, grid, in_specs, out_specs, interpret, config):
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps),
        name=name,
    )


def _permute_call(x_TD, src_idx_R, interpret, config):
    num_tokens, d = x_TD.shape
    num_rows = src_idx_R.shape[0]
    if num_tokens == 0 or num_rows == 0 or d == 0:  # nothing to gather
        return jnp.zeros((num_rows, d), x_TD.dtype)
    br, bd = config.tile(num_rows, d)
    kernel = functools.partial(_permute_kernel, num_rows=num_rows, block_rows=br, block_d=bd)
    return _pallas(
        kernel, "permute", jax.ShapeDtypeStruct((num_rows, d), x_TD.dtype),
        grid=(pl.cdiv(num_rows, br), pl.cdiv(d, bd)),
        in_specs=[_WHOLE, _WHOLE],
        out_specs=pl.BlockSpec((br, bd), lambda i, j: (i, j)),
        interpret=interpret, config=config,
    )(src_idx_R, x_TD)


def _group_rows_by_token(dst_idx_R, weights_R, num_tokens):
    """Inverts dst_idx on the XLA side so the kernel can gather instead of scatter.

    A scatter-add kernel would race when several rows hit one token (and
    atomics make it nondeterministic). Sorting the rows by destination gives
    every token a contiguous run [start, start + count) of the sorted order;
    padding sorts to the end with key num_tokens and is never visited. We use
    the sort rather than a [T, max_fanin] inverse table because the fan-in is
    data dependent (no static bound in this API), and the sort is O(R log R)
    on int32 keys, negligible next to the O(R * D) data movement.
    """
    valid_R = (dst_idx_R >= 0) & (dst_idx_R < num_tokens)
    key_R = jnp.where(valid_R, dst_idx_R, num_tokens)
    order_R = jnp.argsort(key_R, stable=True).astype(jnp.int32)
    count_T = jnp.bincount(key_R, length=num_tokens).astype(jnp.int32)  # drops key T
    start_T = jnp.cumsum(count_T, dtype=jnp.int32) - count_T
    return start_T, count_T, order_R, weights_R[order_R]


def _unpermute_call(buf_RD, dst_idx_R, weights_R, num_tokens, interpret, config):
    num_rows, d = buf_RD.shape
    if num_tokens == 0 or num_rows == 0 or d == 0:  # nothing to sum
        return jnp.zeros((num_tokens, d), buf_RD.dtype)
    start_T, count_T, order_R, w_sorted_R = _group_rows_by_token(
        dst_idx_R, weights_R, num_tokens
    )
    bt, bd = config.tile(num_tokens, d)
    kernel = functools.partial(
        _unpermute_kernel, num_tokens=num_tokens, block_rows=bt, block_d=bd
    )
    return _pallas(
        kernel, "unpermute", jax.ShapeDtypeStruct((num_tokens, d), buf_RD.dtype),
        grid=(pl.cdiv(num_tokens, bt), pl.cdiv(d, bd)),
        in_specs=[_WHOLE] * 5,
        out_specs=pl.BlockSpec((bt, bd), lambda i, j: (i, j)),
        interpret=interpret, config=config,
    )(start_T, count_T, order_R, w_sorted_R, buf_RD)


def _unpermute_bwd_call(dy_TD, buf_RD, dst_idx_R, weights_R, interpret, config):
    num_rows, d = buf_RD.shape
    if dy_TD.shape[0] == 0 or num_rows == 0 or d == 0:  # every row is padding
        return jnp.zeros_like(buf_RD), jnp.zeros_like(weights_R)
    br, bd = config.tile(num_rows, d)
    grid = (pl.cdiv(num_rows, br), pl.cdiv(d, bd))
    kernel = functools.partial(
        _unpermute_bwd_kernel, num_rows=num_rows, block_rows=br, block_d=bd
    )
    tile_spec = pl.BlockSpec((br, bd), lambda i, j: (i, j))
    out_shape = (
        jax.ShapeDtypeStruct(buf_RD.shape, buf_RD.dtype),
        jax.ShapeDtypeStruct((grid[1], num_rows), _ACC_DTYPE),  # per-D-block dots
    )
    dbuf_RD, dw_part_KR = _pallas(
        kernel, "unpermute_bwd", out_shape,
        grid=grid,
        in_specs=[_WHOLE, _WHOLE, _WHOLE, tile_spec],
        out_specs=(tile_spec, pl.BlockSpec((None, br), lambda i, j: (j, i))),
        interpret=interpret, config=config,
    )(dst_idx_R, weights_R, dy_TD, buf_RD)
    # D / block_d partials per row: a negligible f32 reduction next to the R x D tiles.
    return dbuf_RD, jnp.sum(dw_part_KR, axis=0).astype(weights_R.dtype)


# --------------------------------------------------------------------------
# Differentiable ops. Integer index arrays get no gradient (None).
# --------------------------------------------------------------------------


# num_tokens (== x.shape[0]) is passed explicitly: the backward pass needs the
# static T, and residuals can only carry arrays.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _permute_op(x_TD, src_idx_R, num_tokens, interpret, config):
    del num_tokens
    return _permute_call(x_TD, src_idx_R, interpret, config)


def _permute_fwd(x_TD, src_idx_R, num_tokens, interpret, config):
    del num_tokens
    return _permute_call(x_TD, src_idx_R, interpret, config), src_idx_R


def _permute_bwd(num_tokens, interpret, config, src_idx_R, dbuf_RD):
    # Transpose of a gather is a scatter-add: unpermute with unit weights.
    ones_R = jnp.ones(src_idx_R.shape, _ACC_DTYPE)
    dx_TD = _unpermute_call(dbuf_RD, src_idx_R, ones_R, num_tokens, interpret, config)
    return dx_TD, None


_permute_op.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _unpermute_op(buf_RD, dst_idx_R, weights_R, num_tokens, interpret, config):
    return _unpermute_call(buf_RD, dst_idx_R, weights_R, num_tokens, interpret, config)


def _unpermute_fwd(buf_RD, dst_idx_R, weights_R, num_tokens, interpret, config):
    y_TD = _unpermute_call(buf_RD, dst_idx_R, weights_R, num_tokens, interpret, config)
    return y_TD, (buf_RD, dst_idx_R, weights_R)


def _unpermute_bwd(num_tokens, interpret, config, res, dy_TD):
    del num_tokens  # dy_TD carries it
    buf_RD, dst_idx_R, weights_R = res
    dbuf_RD, dw_R = _unpermute_bwd_call(dy_TD, buf_RD, dst_idx_R, weights_R, interpret, config)
    return dbuf_RD, None, dw_R


_unpermute_op.defvjp(_unpermute_fwd, _unpermute_bwd)


def permute(x_TD, src_idx_R, *, num_rows=None, interpret=None, config=None):
    """Gathers token rows into a permuted buffer: ``buf[r] = x[src_idx[r]]``.

    Args:
      x_TD: [T, D] floating activations.
      src_idx_R: [R] int32 source token per output row. ``-1`` (and any id
        outside ``[0, T)``) is padding and yields an all-zero row.
      num_rows: optional static int in ``[0, R]``; if given, only the first
        ``num_rows`` entries of ``src_idx_R`` are used and the output has
        ``num_rows`` rows. ``None`` means ``R``.
      interpret: ``None`` runs the Pallas interpreter unless the default backend
        is GPU (where the Triton kernel is compiled); ``True``/``False`` force it.
      config: ``PermuteConfig`` tiling; ``None`` uses the defaults.

    Returns:
      buf_RD: [num_rows, D] with ``x``'s dtype. Differentiable w.r.t. ``x``
      (the VJP is a scatter-add, computed by the ``unpermute`` kernel).
    """
    x_TD, src_idx_R = _check_permute_args(x_TD, src_idx_R, num_rows)
    interpret, config = _resolve(interpret, config)
    return _permute_op(x_TD, src_idx_R, x_TD.shape[0], interpret, config)


def unpermute(buf_RD, dst_idx_R, weights_R, *, num_tokens, interpret=None, config=None):
    """Weighted scatter-add of buffer rows back to tokens.

    ``y[t] = sum over r with dst_idx[r] == t of weights[r] * buf[r]``,
    accumulated in float32 and cast to ``buf``'s dtype.

    Args:
      buf_RD: [R, D] floating buffer rows.
      dst_idx_R: [R] int32 destination token per row. ``-1`` (and any id outside
        ``[0, num_tokens)``) is padding: the row is ignored. Several rows may
        share a destination; tokens no row names come out as zeros.
      weights_R: [R] floating per-row weights (e.g. router probabilities).
      num_tokens: static int T >= 0, rows of the output.
      interpret: as in ``permute``.
      config: as in ``permute``.

    Returns:
      y_TD: [num_tokens, D] with ``buf``'s dtype. Differentiable w.r.t. ``buf``
      and ``weights``.
    """
    buf_RD, dst_idx_R, weights_R, num_tokens = _check_unpermute_args(
        buf_RD, dst_idx_R, weights_R, num_tokens
    )
    interpret, config = _resolve(interpret, config)
    return _unpermute_op(buf_RD, dst_idx_R, weights_R, num_tokens, interpret, config)
