"""Pallas token-permutation kernels for MoE dispatch (permute) and combine (unpermute).

Legend (array-name suffixes, e.g. `x_TD`, `buf_SD`):
  T  tokens: rows of the token-major activations `x_TD` / `y_TD`
  S  slots: rows of the permuted buffer `buf_SD` (e.g. expert-major, T * K under top-K routing)
  K  top-k: how many slots name one token (its fan-in in `unpermute`)
  D  model dim
  J  blocks of D (grid axis 1 of every kernel)
  N  T or S (helpers that serve both)

Contract, shared by these kernels and the XLA implementation (`hiermoe_jax.permute` with
`impl="xla"`, which runs the pure-jnp `*_reference` functions below):

  permute    buf[s] = x[src[s]]                                      (row gather)
  unpermute  y[t]   = sum over s with dst[s] == t of w[s] * buf[s]   (weighted scatter-add)

  Indices: `-1` marks a padding slot, and so does any other id outside the valid range
  (`[0, T)` for `src`, `[0, num_tokens)` for `dst`) instead of being wrapped or clamped. A
  padding slot of `permute` is all zeros; one of `unpermute` contributes nothing and gets zero
  gradient. Several slots may name one token: `permute` copies it, `unpermute` sums them (the
  top-K combine).

  Numerics: weights and rows are upcast, every product and sum is float32, and each result is
  rounded once, to the rows' dtype (`buf`, `y`, `dx`, `dbuf`) or to the weights' (`dw`). The
  VJP of `permute` is `unpermute` with unit weights; that of `unpermute` is
  `dbuf[s] = w[s] * dy[dst[s]]` and `dw[s] = <buf[s], dy[dst[s]]>`. Summation order is
  unspecified: implementations agree bitwise on gathers, on `dbuf` and on sums of at most two
  terms (top-2 combine; IEEE addition commutes), and otherwise up to f32 reassociation before
  the final rounding (sums of three or more slots, the `dw` dots over D).

  Why float32: rounding each `w * buf` to bf16 before the sum (what the XLA path used to do)
  adds one rounding per slot, and made the two implementations disagree. The kernels are
  memory bound and accumulate in registers, so f32 costs them nothing; XLA pays an f32 [T, D]
  scatter buffer in `permute`'s VJP (its `unpermute` already had one).

GPU backend: Triton (the default Pallas GPU lowering), not Mosaic GPU. All three kernels are
data-dependent row gathers; Triton expresses "load these 16 rows at these runtime addresses,
masked" directly as one vectorised pointer load with no explicit shared-memory staging, and it
runs on Ampere as well as Hopper (and ROCm). Mosaic GPU targets Hopper/Blackwell only, and its
strength, TMA bulk copies of dense tiles, does not help a per-row gather.

Kernels (see `_group_slots_by_token` for why unpermute is a gather):
  permute        grid (S blocks, J)  tile = x[src[slots], cols]
  unpermute      grid (T blocks, J)  tile = sum_k w * buf[k-th slot of each token]
  unpermute_bwd  grid (S blocks, J)  dbuf = w * dy[dst], partial dw dots

Block sizes live in one frozen `PermuteConfig`. Tails are masked inside the kernels, so no
dimension has to be divisible by a block size and no input is padded (padding would cost a full
extra copy of `x` or `buf`).

GPU limits (measured by compiling for H100 and H200 without a device, bf16/f16/f32/f64, tokens
T = 32,768, D = 2048 and 7168; tests/test_kernel_limits.py):
  registers  the binding limit. A program holds its whole tile in registers, spread over its
             threads; past a thread's share ptxas spills to local memory and XLA still compiles
             (slowly: minutes for a 64 x 8192 tile), unless the debug option
             `xla_gpu_fail_ptx_compilation_on_register_spilling` makes it fail. The unpermute
             kernel (f32 accumulator + gathered tile) stops fitting first: at most 64 tile
             elements per thread up to 8 warps (255 registers each), 32 at 16 warps, 16 at 32,
             i.e. a quarter of a thread's registers. `PermuteConfig.check` enforces that and
             `PermuteConfig.for_target` picks the widest `block_d` within it.
  shared     not a limit: nothing is staged in shared memory. XLA reports at most 4 KiB per
  memory     program (index vectors, the dw row sums) for every tile tried, far below the
             227 KiB (232,448 bytes) opt-in limit of H100/H200.
  threads    `num_warps` <= 32 (1,024 threads per block). XLA compiles more without complaint;
             such a kernel would fail at launch, so `PermuteConfig` refuses it.
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

_ACC_DTYPE = jnp.float32  # the contract's product and accumulation dtype

# One Triton program on a CUDA GPU (module docstring, "GPU limits").
_THREADS_PER_WARP = 32
_MAX_WARPS = 32  # 1,024 threads per block, the CUDA limit of every GPU since compute 2.0
_REGISTER_SLOTS_PER_THREAD = 256  # R0..R254 plus the zero register RZ
# Registers a thread needs per tile element it holds (f32 accumulator, gathered value, address
# arithmetic): the unpermute kernel spills above 1/4 of a thread's registers.
_REGISTERS_PER_ELEMENT = 4


def _is_power_of_two(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


def _floor_power_of_two(n: int) -> int:
  return 1 << (n.bit_length() - 1)


@dataclasses.dataclass(frozen=True)
class PermuteConfig:
  """Static tiling of the permutation kernels (hashable; safe as a jit static arg).

  Attributes:
    block_rows: output rows handled by one program: slots of `buf` for `permute` and for the
      `unpermute` backward kernel, tokens of `y` for `unpermute`.
    block_d: columns of the model dimension handled per program. 256 bf16 columns = 512
      contiguous bytes per gathered row, enough for fully coalesced 128-byte transactions.
    num_warps: Triton warps per program. A 16 x 256 f32 accumulator is 32 registers per thread
      at 4 warps, leaving room for the loaded tile.

  Triton tensors must have power-of-two sizes, so both block sizes must be powers of two. They
  need NOT divide the array sizes (tails are masked), and they are clipped to the next power of
  two above the actual size so tiny inputs do not launch mostly-masked tiles.

  The default (16 x 256, 4 warps: 32 elements per thread) fits every GPU in
  `hiermoe_jax.gpu_aot.GPUS` at any D. `for_target(d, gpu)` picks the widest block that fits a
  GPU's registers; `check(d, gpu)` refuses a config that does not.
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
        raise ValueError(f"PermuteConfig.{name}={value} must be a positive power of two "
                         "(Triton block and warp counts are powers of two)")
    if self.num_warps > _MAX_WARPS:
      raise ValueError(f"PermuteConfig.num_warps={self.num_warps} is too many; valid: <= "
                       f"{_MAX_WARPS} ({_MAX_WARPS * _THREADS_PER_WARP} threads per block, the "
                       "CUDA limit)")

  def tile(self, rows: int, d: int) -> tuple[int, int]:
    """Effective (block_rows, block_d) for an output of `rows` x `d`."""
    return (min(self.block_rows, pl.next_power_of_2(max(rows, 1))),
            min(self.block_d, pl.next_power_of_2(max(d, 1))))

  @property
  def threads(self) -> int:
    return self.num_warps * _THREADS_PER_WARP

  def elements_per_thread(self, d: int) -> int:
    """Tile elements each thread holds at model dim `d` (a full block of rows; at least 1)."""
    rows, cols = self.tile(self.block_rows, _check_static_int("d", d, 1))
    return max(1, rows * cols // self.threads)

  def check(self, d: int, gpu) -> PermuteConfig:
    """This config, if its tile at model dim `d` fits `gpu`'s registers; else ValueError.

    `gpu`: a `hiermoe_jax.gpu_aot` GPU name ("h100", "h200", "b200") or a `GpuSpec`.
    """
    have = self.elements_per_thread(d)
    rows, cols = self.tile(self.block_rows, d)
    name, registers = _registers_per_thread(gpu, self.num_warps)
    limit = registers // _REGISTERS_PER_ELEMENT
    if have > limit:
      raise ValueError(
          f"{self} does not fit {name} at {d=}: its {rows} x {cols} tile is {have} elements per "
          f"thread over {self.threads} threads; valid: <= {limit} ({registers} registers per "
          f"thread / {_REGISTERS_PER_ELEMENT} per element), beyond which ptxas spills the tile "
          f"to local memory. PermuteConfig.for_target(d={d}, gpu={name!r}) picks a block_d "
          "that fits")
    return self

  @classmethod
  def for_target(cls, d: int, gpu, *, block_rows: int = 16,
                 num_warps: int = 4) -> PermuteConfig:
    """The widest `block_d` (up to D's next power of two) whose tile fits `gpu`'s registers.

    The same for every float dtype (measured: the accumulator is f32 whatever the rows are).
    At the defaults (16 rows, 4 warps: <= 64 elements per thread) that is block_d = 512 on
    H100, H200 and B200 for any D > 256.
    """
    d = _check_static_int("d", d, 1)
    base = cls(block_rows=block_rows, block_d=1, num_warps=num_warps)
    name, registers = _registers_per_thread(gpu, num_warps)
    elements = registers // _REGISTERS_PER_ELEMENT * base.threads  # per program
    if block_rows > elements:
      raise ValueError(f"PermuteConfig.for_target: {block_rows=} is too many for {name} at "
                       f"{num_warps=}; valid: <= {elements} (one column each)")
    cols = min(_floor_power_of_two(elements // block_rows), pl.next_power_of_2(d))
    return dataclasses.replace(base, block_d=cols).check(d, gpu)


def _registers_per_thread(gpu, num_warps: int) -> tuple[str, int]:
  """(GPU name, registers each thread of a `num_warps`-warp program can have)."""
  from hiermoe_jax import gpu_aot  # lazy: only this reads GPU facts

  spec = gpu_aot.gpu_spec(gpu, "PermuteConfig")
  name = next((key for key, value in gpu_aot.GPUS.items() if value == spec), spec.description)
  threads = num_warps * _THREADS_PER_WARP
  if threads > spec.threads_per_block:
    raise ValueError(f"{num_warps=} is {threads} threads; valid for {name}: <= "
                     f"{spec.threads_per_block} threads per block")
  return name, min(_REGISTER_SLOTS_PER_THREAD, spec.registers_per_block // threads)


DEFAULT_CONFIG = PermuteConfig()


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static a custom_vjp op needs, as its one nondiff argument.

  `num_tokens` is T: `permute`'s backward pass needs it, and residuals can only carry arrays.
  """

  num_tokens: int
  interpret: bool
  config: PermuteConfig


# ------------------------------------------------------------------------------------------
# Argument validation (shared by kernels and references so both agree).
# ------------------------------------------------------------------------------------------


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
    raise ValueError(f"{name} has length {idx.shape[0]} but {length_name} has {length} rows; "
                     "they must match")
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


def _check_permute_args(x_TD, src_idx_S, num_rows):
  x_TD = _check_activations("x", x_TD)
  src_idx_S = _check_index("src_idx", src_idx_S)
  if num_rows is not None:
    n = _check_static_int("num_rows", num_rows, 0, src_idx_S.shape[0])
    src_idx_S = src_idx_S[:n]
  return x_TD, src_idx_S


def _check_unpermute_args(buf_SD, dst_idx_S, weights_S, num_tokens):
  buf_SD = _check_activations("buf", buf_SD)
  num_slots = buf_SD.shape[0]
  dst_idx_S = _check_index("dst_idx", dst_idx_S, "buf", num_slots)
  weights_S = jnp.asarray(weights_S)
  if weights_S.ndim != 1:
    raise ValueError(f"weights must be 1-D, got shape {weights_S.shape}")
  if not jnp.issubdtype(weights_S.dtype, jnp.floating):
    raise TypeError(f"weights must have a floating dtype, got {weights_S.dtype}")
  if weights_S.shape[0] != num_slots:
    raise ValueError(f"weights has length {weights_S.shape[0]} but buf has {num_slots} rows; "
                     "they must match")
  num_tokens = _check_static_int("num_tokens", num_tokens, 0)
  return buf_SD, dst_idx_S, weights_S, num_tokens


def _resolve(interpret, config):
  if interpret is None:
    # The kernels lower through Triton, i.e. only on GPU; everywhere else (CPU in particular)
    # run them with the Pallas interpreter.
    interpret = jax.default_backend() != "gpu"
  elif not isinstance(interpret, bool):
    raise TypeError(f"interpret must be None, True or False, got {interpret!r}")
  if config is None:
    config = DEFAULT_CONFIG
  elif not isinstance(config, PermuteConfig):
    raise TypeError(f"config must be a PermuteConfig or None, got {type(config).__name__}")
  return interpret, config


# ------------------------------------------------------------------------------------------
# References: the contract in pure jnp, differentiated by JAX autodiff. They are also the XLA
# implementation behind `hiermoe_jax.permute`.
# ------------------------------------------------------------------------------------------


def permute_reference(x_TD, src_idx_S, *, num_rows=None):
  """Pure-jnp `permute` (same arguments, same contract)."""
  x_TD, src_idx_S = _check_permute_args(x_TD, src_idx_S, num_rows)
  num_tokens, d = x_TD.shape
  if num_tokens == 0:  # every id is padding; jnp.take refuses an empty axis
    return jnp.zeros((src_idx_S.shape[0], d), x_TD.dtype)
  valid_S = (src_idx_S >= 0) & (src_idx_S < num_tokens)
  # Route padding to the out-of-bounds id T so mode="fill" zeroes it (a raw -1 would wrap
  # around to the last token).
  safe_S = jnp.where(valid_S, src_idx_S, num_tokens)
  # Gathering an f32 copy is exact, and makes autodiff's transpose (the scatter-add of the
  # cotangent) accumulate in f32, as the contract says. XLA fuses both converts into the
  # gather (checked on CPU), so no f32 copy of x is materialised.
  buf_SD = jnp.take(x_TD.astype(_ACC_DTYPE), safe_S, axis=0, mode="fill", fill_value=0)
  return buf_SD.astype(x_TD.dtype)


def unpermute_reference(buf_SD, dst_idx_S, weights_S, *, num_tokens):
  """Pure-jnp `unpermute` (same arguments, same contract)."""
  buf_SD, dst_idx_S, weights_S, num_tokens = _check_unpermute_args(
      buf_SD, dst_idx_S, weights_S, num_tokens)
  valid_S = (dst_idx_S >= 0) & (dst_idx_S < num_tokens)
  safe_S = jnp.where(valid_S, dst_idx_S, num_tokens)  # dropped by mode="drop"
  contrib_SD = weights_S.astype(_ACC_DTYPE)[:, None] * buf_SD.astype(_ACC_DTYPE)
  y_TD = jnp.zeros((num_tokens, buf_SD.shape[1]), _ACC_DTYPE)
  y_TD = y_TD.at[safe_S].add(contrib_SD, mode="drop")
  return y_TD.astype(buf_SD.dtype)


# ------------------------------------------------------------------------------------------
# Kernels. Gathered inputs (x, buf, dy) and the small index vectors are whole arrays in global
# memory: which rows a program reads is data dependent, so those accesses are explicit masked
# gathers (masked-off lanes issue no memory traffic on GPU; their indices are clamped to 0 so
# the interpreter's gathers stay in bounds). Everything else is a BlockSpec tile (`*_blk`
# refs), so the interpreter copies one tile per grid step instead of the whole array. Triton
# does not mask partial edge tiles, hence the row/column masks on every tile load and store.
# ------------------------------------------------------------------------------------------


def _load_vec(ref_N, idx, mask, other):
  return plgpu.load(ref_N.at[jnp.where(mask, idx, 0)], mask=mask, other=other)


def _load_tile(ref_ND, rows, row_ok, cols, col_ok):
  """Gathers ref[rows, cols] as a [rows, cols] tile; zeros where masked."""
  safe_rows = jnp.where(row_ok, rows, 0)[:, None]
  safe_cols = jnp.where(col_ok, cols, 0)[None, :]
  mask = row_ok[:, None] & col_ok[None, :]
  return plgpu.load(ref_ND.at[safe_rows, safe_cols], mask=mask, other=0)


def _store_tile(blk, value, row_ok, col_ok):
  # Whole-tile store: no clamped indices here, since duplicate (clamped) indices in a masked
  # store would race with the real writes in interpret mode.
  plgpu.store(blk, value.astype(blk.dtype), mask=row_ok[:, None] & col_ok[None, :])


def _iota(n: int):
  return jnp.arange(n, dtype=jnp.int32)


def _block_iota(axis: int, block: int):
  """Global indices covered by this program's block along grid axis `axis`."""
  return pl.program_id(axis) * block + _iota(block)


def _gather_slot_block(token_ref_S, x_ref_TD, *, num_slots, block_rows, block_d):
  """This program's (slot block, D block) of x[token[slot]], zeros where the slot is
  padding or its token id is out of range. Returns (tile, slot_ok, col_ok)."""
  num_tokens, d = x_ref_TD.shape
  slots = _block_iota(0, block_rows)
  cols = _block_iota(1, block_d)
  slot_ok, col_ok = slots < num_slots, cols < d
  token = _load_vec(token_ref_S, slots, slot_ok, other=-1)
  valid = slot_ok & (token >= 0) & (token < num_tokens)
  return _load_tile(x_ref_TD, token, valid, cols, col_ok), slot_ok, col_ok


def _permute_kernel(src_ref_S, x_ref_TD, out_blk, *, num_slots, block_rows, block_d):
  """Grid (slot blocks, J): out[slots, cols] = x[src[slots], cols]."""
  tile, slot_ok, col_ok = _gather_slot_block(src_ref_S, x_ref_TD, num_slots=num_slots,
                                             block_rows=block_rows, block_d=block_d)
  _store_tile(out_blk, tile, slot_ok, col_ok)


def _unpermute_kernel(start_ref_T, count_ref_T, order_ref_S, w_sorted_ref_S, buf_ref_SD, y_blk,
                      *, num_tokens, block_rows, block_d):
  """Grid (token blocks, J): weighted gather-sum over each token's slots.

  Token t owns slots order[start[t] : start[t] + count[t]]. Step k of the loop gathers the k-th
  slot of every token in the block at once; the trip count is the block's largest fan-in (K for
  regular top-K routing).
  """
  d = buf_ref_SD.shape[1]
  toks = _block_iota(0, block_rows)
  cols = _block_iota(1, block_d)
  tok_ok, col_ok = toks < num_tokens, cols < d
  start = _load_vec(start_ref_T, toks, tok_ok, other=0)
  count = _load_vec(count_ref_T, toks, tok_ok, other=0)

  def body(k, acc):
    has_slot = k < count
    pos = start + k
    slots = _load_vec(order_ref_S, pos, has_slot, other=0)
    w = _load_vec(w_sorted_ref_S, pos, has_slot, other=0).astype(_ACC_DTYPE)
    tile = _load_tile(buf_ref_SD, slots, has_slot, cols, col_ok).astype(_ACC_DTYPE)
    return acc + w[:, None] * tile

  acc = jax.lax.fori_loop(0, jnp.max(count), body,
                          jnp.zeros((block_rows, block_d), _ACC_DTYPE))
  _store_tile(y_blk, acc, tok_ok, col_ok)


def _unpermute_bwd_kernel(dst_ref_S, w_ref_S, dy_ref_TD, buf_blk, dbuf_blk, dw_part_blk,
                          *, num_slots, block_rows, block_d):
  """Grid (slot blocks, J): dbuf[s] = w[s] * dy[dst[s]] and the partial dot
  <buf[s], dy[dst[s]]> over this D block (summed over the J blocks outside).

  Both cotangents need the same gathered dy tile, so one kernel reads dy and buf once instead
  of materialising the gathered dy and re-reading it.
  """
  g, slot_ok, col_ok = _gather_slot_block(dst_ref_S, dy_ref_TD, num_slots=num_slots,
                                         block_rows=block_rows, block_d=block_d)
  g = g.astype(_ACC_DTYPE)
  slots = _block_iota(0, block_rows)
  w = _load_vec(w_ref_S, slots, slot_ok, other=0).astype(_ACC_DTYPE)
  mask = slot_ok[:, None] & col_ok[None, :]
  b = plgpu.load(buf_blk, mask=mask, other=0).astype(_ACC_DTYPE)
  _store_tile(dbuf_blk, w[:, None] * g, slot_ok, col_ok)
  plgpu.store(dw_part_blk, jnp.sum(g * b, axis=1), mask=slot_ok)


# ------------------------------------------------------------------------------------------
# pallas_call wrappers (arguments already validated).
# ------------------------------------------------------------------------------------------


_WHOLE = pl.no_block_spec  # the kernel sees the whole array and indexes it itself


def _pallas(kernel, name, out_shape, static: _Static, *, grid, in_specs, out_specs):
  return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      interpret=static.interpret,
      compiler_params=plgpu.CompilerParams(num_warps=static.config.num_warps),
      name=name,
  )


def _permute_call(x_TD, src_idx_S, static: _Static):
  num_tokens, d = x_TD.shape
  num_slots = src_idx_S.shape[0]
  if num_tokens == 0 or num_slots == 0 or d == 0:  # nothing to gather
    return jnp.zeros((num_slots, d), x_TD.dtype)
  bs, bd = static.config.tile(num_slots, d)
  kernel = functools.partial(_permute_kernel, num_slots=num_slots, block_rows=bs, block_d=bd)
  return _pallas(
      kernel, "permute", jax.ShapeDtypeStruct((num_slots, d), x_TD.dtype), static,
      grid=(pl.cdiv(num_slots, bs), pl.cdiv(d, bd)),
      in_specs=[_WHOLE, _WHOLE],
      out_specs=pl.BlockSpec((bs, bd), lambda i, j: (i, j)),
  )(src_idx_S, x_TD)


def _group_slots_by_token(dst_idx_S, weights_S, num_tokens):
  """Inverts dst_idx on the XLA side so the kernel can gather instead of scatter.

  A scatter-add kernel would race when several slots hit one token (and atomics make it
  nondeterministic). Sorting the slots by destination gives every token a contiguous run
  [start, start + count) of the sorted order; padding sorts to the end with key num_tokens and
  is never visited. We use the sort rather than a [T, max fan-in] inverse table because the
  fan-in is data dependent (no static bound in this API), and the sort is O(S log S) on int32
  keys, negligible next to the O(S * D) data movement.
  """
  valid_S = (dst_idx_S >= 0) & (dst_idx_S < num_tokens)
  key_S = jnp.where(valid_S, dst_idx_S, num_tokens)
  order_S = jnp.argsort(key_S, stable=True).astype(jnp.int32)
  count_T = jnp.bincount(key_S, length=num_tokens).astype(jnp.int32)  # drops key T
  start_T = jnp.cumsum(count_T, dtype=jnp.int32) - count_T
  return start_T, count_T, order_S, weights_S[order_S]


def _unpermute_call(buf_SD, dst_idx_S, weights_S, static: _Static):
  num_tokens = static.num_tokens
  num_slots, d = buf_SD.shape
  if num_tokens == 0 or num_slots == 0 or d == 0:  # nothing to sum
    return jnp.zeros((num_tokens, d), buf_SD.dtype)
  start_T, count_T, order_S, w_sorted_S = _group_slots_by_token(
      dst_idx_S, weights_S, num_tokens)
  bt, bd = static.config.tile(num_tokens, d)
  kernel = functools.partial(_unpermute_kernel, num_tokens=num_tokens, block_rows=bt,
                             block_d=bd)
  return _pallas(
      kernel, "unpermute", jax.ShapeDtypeStruct((num_tokens, d), buf_SD.dtype), static,
      grid=(pl.cdiv(num_tokens, bt), pl.cdiv(d, bd)),
      in_specs=[_WHOLE] * 5,
      out_specs=pl.BlockSpec((bt, bd), lambda i, j: (i, j)),
  )(start_T, count_T, order_S, w_sorted_S, buf_SD)


def _unpermute_bwd_call(dy_TD, buf_SD, dst_idx_S, weights_S, static: _Static):
  num_slots, d = buf_SD.shape
  if dy_TD.shape[0] == 0 or num_slots == 0 or d == 0:  # every slot is padding
    return jnp.zeros_like(buf_SD), jnp.zeros_like(weights_S)
  bs, bd = static.config.tile(num_slots, d)
  grid = (pl.cdiv(num_slots, bs), pl.cdiv(d, bd))
  kernel = functools.partial(_unpermute_bwd_kernel, num_slots=num_slots, block_rows=bs,
                             block_d=bd)
  tile_spec = pl.BlockSpec((bs, bd), lambda i, j: (i, j))
  out_shape = (
      jax.ShapeDtypeStruct(buf_SD.shape, buf_SD.dtype),
      jax.ShapeDtypeStruct((grid[1], num_slots), _ACC_DTYPE),  # per-D-block dots
  )
  dbuf_SD, dw_part_JS = _pallas(
      kernel, "unpermute_bwd", out_shape, static,
      grid=grid,
      in_specs=[_WHOLE, _WHOLE, _WHOLE, tile_spec],
      out_specs=(tile_spec, pl.BlockSpec((None, bs), lambda i, j: (j, i))),
  )(dst_idx_S, weights_S, dy_TD, buf_SD)
  # J partials per slot: a negligible f32 reduction next to the S x D tiles.
  return dbuf_SD, jnp.sum(dw_part_JS, axis=0).astype(weights_S.dtype)


# ------------------------------------------------------------------------------------------
# Differentiable ops. Integer index arrays get no gradient (None).
# ------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _permute_op(x_TD, src_idx_S, static: _Static):
  return _permute_call(x_TD, src_idx_S, static)


def _permute_fwd(x_TD, src_idx_S, static):
  return _permute_call(x_TD, src_idx_S, static), src_idx_S


def _permute_bwd(static, src_idx_S, dbuf_SD):
  # Transpose of a gather is a scatter-add: unpermute with unit weights.
  ones_S = jnp.ones(src_idx_S.shape, _ACC_DTYPE)
  return _unpermute_call(dbuf_SD, src_idx_S, ones_S, static), None


_permute_op.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _unpermute_op(buf_SD, dst_idx_S, weights_S, static: _Static):
  return _unpermute_call(buf_SD, dst_idx_S, weights_S, static)


def _unpermute_fwd(buf_SD, dst_idx_S, weights_S, static):
  y_TD = _unpermute_call(buf_SD, dst_idx_S, weights_S, static)
  return y_TD, (buf_SD, dst_idx_S, weights_S)


def _unpermute_bwd(static, res, dy_TD):
  buf_SD, dst_idx_S, weights_S = res
  dbuf_SD, dw_S = _unpermute_bwd_call(dy_TD, buf_SD, dst_idx_S, weights_S, static)
  return dbuf_SD, None, dw_S


_unpermute_op.defvjp(_unpermute_fwd, _unpermute_bwd)


def permute(x_TD, src_idx_S, *, num_rows=None, interpret=None, config=None):
  """Gathers token rows into a permuted buffer: `buf[s] = x[src_idx[s]]`.

  Args:
    x_TD: [T, D] floating activations.
    src_idx_S: [S] int32 source token per slot. `-1` (and any id outside `[0, T)`) is padding
      and yields an all-zero row.
    num_rows: optional static int in `[0, S]`; if given, only the first `num_rows` entries of
      `src_idx_S` are used and the output has `num_rows` rows. `None` means `S`.
    interpret: `None` runs the Pallas interpreter unless the default backend is GPU (where the
      Triton kernel is compiled); `True`/`False` force it.
    config: `PermuteConfig` tiling; `None` uses the defaults.

  Returns:
    buf_SD: [num_rows, D] with `x`'s dtype. Differentiable w.r.t. `x` (the VJP is a
    scatter-add, computed by the `unpermute` kernel).
  """
  x_TD, src_idx_S = _check_permute_args(x_TD, src_idx_S, num_rows)
  interpret, config = _resolve(interpret, config)
  return _permute_op(x_TD, src_idx_S, _Static(x_TD.shape[0], interpret, config))


def unpermute(buf_SD, dst_idx_S, weights_S, *, num_tokens, interpret=None, config=None):
  """Weighted scatter-add of buffer rows back to tokens.

  `y[t] = sum over s with dst_idx[s] == t of weights[s] * buf[s]`, multiplied and accumulated
  in float32 and cast to `buf`'s dtype (the module docstring's contract).

  Args:
    buf_SD: [S, D] floating buffer rows.
    dst_idx_S: [S] int32 destination token per slot. `-1` (and any id outside
      `[0, num_tokens)`) is padding: the slot is ignored. Several slots may share a
      destination; tokens no slot names come out as zeros.
    weights_S: [S] floating per-slot weights (e.g. router probabilities).
    num_tokens: static int T >= 0, rows of the output.
    interpret: as in `permute`.
    config: as in `permute`.

  Returns:
    y_TD: [num_tokens, D] with `buf`'s dtype. Differentiable w.r.t. `buf` and `weights`.
  """
  buf_SD, dst_idx_S, weights_S, num_tokens = _check_unpermute_args(
      buf_SD, dst_idx_S, weights_S, num_tokens)
  interpret, config = _resolve(interpret, config)
  return _unpermute_op(buf_SD, dst_idx_S, weights_S, _Static(num_tokens, interpret, config))
