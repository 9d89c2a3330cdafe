"""Tests for pallas_kernels.permute / unpermute (interpret mode on CPU) and their CUDA export.

Shape legend: T tokens, S slots (rows of the permuted buffer), D model dim.
"""

import functools
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Make the repo importable without an (up-to-date) editable install.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pallas_kernels import (  # noqa: E402
    PermuteConfig,
    permute,
    permute_reference,
    unpermute,
    unpermute_reference,
)
from pallas_kernels.permute import _resolve  # noqa: E402

# Small sizes keep the interpreter fast. Blocks smaller than the arrays, with
# ragged tails in both S/T and D, exercise multi-program grids and masking.
T, D, S = 13, 200, 37
CFG = PermuteConfig(block_rows=8, block_d=128)
DTYPES = [jnp.float32, jnp.bfloat16]

# All sums accumulate in f32 but in a different order than the reference
# (sorted rows, per-D-block partial dots), so results differ by a few f32 ulps
# of the summands. Relative tolerance per result dtype: f32 a few ulps; bf16
# results are rounded once from such f32 sums, so at most one bf16 ulp
# (2**-8 .. 2**-7 relative) apart.
RTOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2.0**-7}
# Absolute slack for entries that nearly cancel (e.g. weight-gradient dots),
# relative to the array's scale: the f32 reassociation error, in any dtype.
ATOL_REL_TO_MAX = 1e-5


def assert_close(actual, desired):
  actual, desired = np.asarray(actual), np.asarray(desired)
  assert actual.dtype == desired.dtype, (actual.dtype, desired.dtype)
  assert actual.shape == desired.shape, (actual.shape, desired.shape)
  desired64 = desired.astype(np.float64)
  atol = ATOL_REL_TO_MAX * float(np.max(np.abs(desired64), initial=0.0))
  np.testing.assert_allclose(
      actual.astype(np.float64), desired64, rtol=RTOL[jnp.dtype(actual.dtype)], atol=atol
  )


def normal(key, shape, dtype):
  # Offset away from zero: a zero output must come from padding, never from data.
  z = jax.random.normal(key, shape, jnp.float32)
  return (z + jnp.where(z >= 0, 0.5, -0.5)).astype(dtype)


def src_ids(key, num_rows, num_tokens):
  """Random ids incl. repeats, -1 padding and out-of-range ids (-3, T, T + 5)."""
  ids = jax.random.randint(key, (num_rows,), 0, num_tokens, jnp.int32)
  return ids.at[:6].set(jnp.array([-1, -3, num_tokens, num_tokens + 5, 2, 2], jnp.int32))


def dst_ids(key, num_rows, num_tokens):
  """Like src_ids, but token num_tokens - 1 never receives a row (empty output row)."""
  ids = jax.random.randint(key, (num_rows,), 0, num_tokens - 1, jnp.int32)
  return ids.at[:6].set(jnp.array([-1, -3, num_tokens, num_tokens + 5, 2, 2], jnp.int32))


def valid_mask(ids, num_tokens):
  ids = np.asarray(ids)
  return (ids >= 0) & (ids < num_tokens)


# ----------------------------------------------------------------- permute


@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_forward(dtype):
  kx, ki = jax.random.split(jax.random.key(0))
  x_TD = normal(kx, (T, D), dtype)
  src_S = src_ids(ki, S, T)
  buf_SD = permute(x_TD, src_S, config=CFG)
  # A gather is exact in every dtype.
  np.testing.assert_array_equal(np.asarray(buf_SD), np.asarray(permute_reference(x_TD, src_S)))
  # Documented convention, checked independently of the reference.
  ok = valid_mask(src_S, T)
  assert not ok[:4].any() and ok[4:].all()
  x_np = np.asarray(x_TD)
  expected = np.where(ok[:, None], x_np[np.where(ok, src_S, 0)], 0).astype(x_np.dtype)
  np.testing.assert_array_equal(np.asarray(buf_SD), expected)
  assert np.asarray(buf_SD)[4:].any(axis=1).all()  # every routed row carries data


@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_vjp(dtype):
  kx, ki, kc = jax.random.split(jax.random.key(1), 3)
  x_TD = normal(kx, (T, D), dtype)
  src_S = src_ids(ki, S, T)
  dbuf_SD = normal(kc, (S, D), dtype)
  _, vjp = jax.vjp(lambda x: permute(x, src_S, config=CFG), x_TD)
  _, vjp_ref = jax.vjp(lambda x: permute_reference(x, src_S), x_TD)
  (dx_TD,), (dx_ref_TD,) = vjp(dbuf_SD), vjp_ref(dbuf_SD)
  assert_close(dx_TD, dx_ref_TD)
  # Scatter-add semantics: padding / out-of-range rows send nothing anywhere.
  ok = valid_mask(src_S, T)
  expected = np.zeros((T, D))
  np.add.at(expected, np.asarray(src_S)[ok], np.asarray(dbuf_SD, np.float64)[ok])
  assert_close(dx_TD, expected.astype(dx_TD.dtype))


def test_permute_num_rows_limits_rows():
  kx, ki = jax.random.split(jax.random.key(2))
  x_TD = normal(kx, (T, D), jnp.float32)
  src_S = src_ids(ki, S, T)
  buf = permute(x_TD, src_S, num_rows=20, config=CFG)
  assert buf.shape == (20, D)
  np.testing.assert_array_equal(
      np.asarray(buf), np.asarray(permute(x_TD, src_S[:20], config=CFG))
  )
  np.testing.assert_array_equal(
      np.asarray(buf), np.asarray(permute_reference(x_TD, src_S, num_rows=20))
  )
  assert permute(x_TD, src_S, num_rows=0, config=CFG).shape == (0, D)
  assert permute(x_TD, src_S, num_rows=S, config=CFG).shape == (S, D)


# --------------------------------------------------------------- unpermute


@pytest.mark.parametrize("dtype", DTYPES)
def test_unpermute_forward(dtype):
  kb, ki, kw = jax.random.split(jax.random.key(3), 3)
  buf_SD = normal(kb, (S, D), dtype)
  dst_S = dst_ids(ki, S, T)
  w_S = jax.random.uniform(kw, (S,), jnp.float32, 0.1, 1.0)
  y_TD = unpermute(buf_SD, dst_S, w_S, num_tokens=T, config=CFG)
  assert y_TD.shape == (T, D) and y_TD.dtype == dtype
  assert_close(y_TD, unpermute_reference(buf_SD, dst_S, w_S, num_tokens=T))
  # Convention checked independently: f64 scatter-add over the valid rows only.
  ok = valid_mask(dst_S, T)
  dst_np = np.asarray(dst_S)
  fanin_T = np.bincount(dst_np[ok], minlength=T)
  assert fanin_T.max() >= 2 and fanin_T[T - 1] == 0  # repeats and an empty token
  expected = np.zeros((T, D))
  np.add.at(
      expected, dst_np[ok],
      np.asarray(w_S, np.float64)[ok, None] * np.asarray(buf_SD, np.float64)[ok],
  )
  assert_close(y_TD, expected.astype(y_TD.dtype))
  # Tokens nobody routes to are exactly zero; every routed token is not.
  np.testing.assert_array_equal(np.asarray(y_TD).any(axis=1), fanin_T > 0)


def test_unpermute_skewed_fanin():
  """One token receives most rows: long per-token loop next to short ones."""
  kb, kw = jax.random.split(jax.random.key(4))
  buf_SD = normal(kb, (S, D), jnp.float32)
  dst_S = jnp.where(jnp.arange(S) % 5 == 0, jnp.arange(S) % T, 3).astype(jnp.int32)
  w_S = jax.random.uniform(kw, (S,), jnp.float32, -1.0, 1.0)
  assert_close(
      unpermute(buf_SD, dst_S, w_S, num_tokens=T, config=CFG),
      unpermute_reference(buf_SD, dst_S, w_S, num_tokens=T),
  )


@pytest.mark.parametrize(
    "buf_dtype, w_dtype",
    [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32), (jnp.bfloat16, jnp.bfloat16)],
)
def test_unpermute_vjp(buf_dtype, w_dtype):
  kb, ki, kw, kc = jax.random.split(jax.random.key(5), 4)
  buf_SD = normal(kb, (S, D), buf_dtype)
  dst_S = dst_ids(ki, S, T)
  w_S = jax.random.uniform(kw, (S,), jnp.float32, 0.1, 1.0).astype(w_dtype)
  dy_TD = normal(kc, (T, D), buf_dtype)
  fn = lambda b, w: unpermute(b, dst_S, w, num_tokens=T, config=CFG)  # noqa: E731
  fn_ref = lambda b, w: unpermute_reference(b, dst_S, w, num_tokens=T)  # noqa: E731
  y, vjp = jax.vjp(fn, buf_SD, w_S)
  y_ref, vjp_ref = jax.vjp(fn_ref, buf_SD, w_S)
  assert_close(y, y_ref)
  (dbuf_SD, dw_S), (dbuf_ref_SD, dw_ref_S) = vjp(dy_TD), vjp_ref(dy_TD)
  assert dbuf_SD.dtype == buf_dtype and dw_S.dtype == w_dtype
  assert_close(dbuf_SD, dbuf_ref_SD)
  assert_close(dw_S, dw_ref_S)
  # Padding rows get exactly zero gradient; routed rows do not.
  ok = valid_mask(dst_S, T)
  assert not np.asarray(dbuf_SD)[~ok].any() and not np.asarray(dw_S)[~ok].any()
  assert np.asarray(dw_S)[ok].all()


def test_no_gradient_for_indices():
  x_TD = normal(jax.random.key(6), (T, D), jnp.float32)
  src_S = src_ids(jax.random.key(7), S, T)
  _, vjp = jax.vjp(lambda x, i: permute(x, i, config=CFG), x_TD, src_S)
  _, di = vjp(jnp.ones((S, D)))
  assert di.dtype == jax.dtypes.float0


# ------------------------------------------------------------- edge cases


def test_all_padding():
  pad_S = jnp.resize(jnp.array([-1, -2, T, T + 1], jnp.int32), S)  # only invalid ids
  x_TD = normal(jax.random.key(8), (T, D), jnp.float32)
  buf, vjp = jax.vjp(lambda x: permute(x, pad_S, config=CFG), x_TD)
  assert buf.shape == (S, D) and not np.asarray(buf).any()
  assert not np.asarray(vjp(jnp.ones((S, D)))[0]).any()

  buf_SD = normal(jax.random.key(9), (S, D), jnp.float32)
  w_S = jnp.full((S,), 0.5, jnp.float32)
  y, vjp = jax.vjp(
      lambda b, w: unpermute(b, pad_S, w, num_tokens=T, config=CFG), buf_SD, w_S
  )
  assert y.shape == (T, D) and not np.asarray(y).any()
  np.testing.assert_array_equal(
      np.asarray(y), np.asarray(unpermute_reference(buf_SD, pad_S, w_S, num_tokens=T))
  )
  dbuf, dw = vjp(jnp.ones((T, D)))
  assert not np.asarray(dbuf).any() and not np.asarray(dw).any()


def test_zero_sizes():
  x_TD = normal(jax.random.key(10), (T, D), jnp.float32)
  empty_S = jnp.zeros((0,), jnp.int32)
  buf, vjp = jax.vjp(lambda x: permute(x, empty_S), x_TD)
  assert buf.shape == (0, D)
  dx = vjp(jnp.zeros((0, D)))[0]
  assert dx.shape == (T, D) and not np.asarray(dx).any()
  # No tokens: every id is out of range, hence padding.
  ids = jnp.array([-1, 0, 1], jnp.int32)
  no_tok = permute(jnp.zeros((0, D)), ids)
  assert no_tok.shape == (3, D) and not np.asarray(no_tok).any()
  np.testing.assert_array_equal(no_tok, permute_reference(jnp.zeros((0, D)), ids))
  buf3 = normal(jax.random.key(11), (3, D), jnp.float32)
  assert unpermute(buf3, ids, jnp.ones(3), num_tokens=0).shape == (0, D)
  y = unpermute(jnp.zeros((0, D)), empty_S, jnp.zeros((0,)), num_tokens=T)
  assert y.shape == (T, D) and not np.asarray(y).any()


def test_default_config_and_interpret_under_jit_grad():
  assert _resolve(None, None) == (jax.default_backend() != "gpu", PermuteConfig())
  t, d, s = 40, 300, 70  # default blocks (16 x 256) with ragged tails
  kx, ki, kw, kc = jax.random.split(jax.random.key(12), 4)
  x_TD = normal(kx, (t, d), jnp.float32)
  idx_S = src_ids(ki, s, t)
  w_S = jax.random.uniform(kw, (s,), jnp.float32, 0.1, 1.0)
  c_TD = normal(kc, (t, d), jnp.float32)

  def loss(permute_fn, unpermute_fn, x, w):  # dispatch -> combine, as in an MoE layer
    y = unpermute_fn(permute_fn(x, idx_S), idx_S, w, num_tokens=t)
    return jnp.sum(y * c_TD), y

  grad_fn = jax.jit(jax.grad(functools.partial(loss, permute, unpermute), (0, 1), has_aux=True))
  ref_fn = jax.grad(
      functools.partial(loss, permute_reference, unpermute_reference), (0, 1), has_aux=True
  )
  ((dx, dw), y), ((dx_ref, dw_ref), y_ref) = grad_fn(x_TD, w_S), ref_fn(x_TD, w_S)
  assert_close(y, y_ref)
  assert_close(dx, dx_ref)
  assert_close(dw, dw_ref)


# ------------------------------------------------------------- validation

_X = jnp.ones((4, 8), jnp.float32)
_I = jnp.zeros((6,), jnp.int32)
_B = jnp.ones((6, 8), jnp.float32)
_W = jnp.ones((6,), jnp.float32)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: permute(jnp.ones(8), _I), ValueError, r"x must be 2-D, got shape \(8,\)"),
        (lambda: permute(_X.astype(jnp.int32), _I), TypeError, "x must have a floating dtype"),
        (lambda: permute(_X, _I[None]), ValueError, r"src_idx must be 1-D, got shape \(1, 6\)"),
        (lambda: permute(_X, _I.astype(jnp.float32)), TypeError, "src_idx must have dtype int32"),
        (lambda: permute(_X, _I, num_rows=7), ValueError,
         r"num_rows=7 is out of range; valid: \[0, 6\]"),
        (lambda: permute(_X, _I, num_rows=2.0), TypeError,
         "num_rows must be a static Python int"),
        (lambda: permute(_X, _I, interpret="yes"), TypeError,
         "interpret must be None, True or False"),
        (lambda: permute(_X, _I, config={"block_d": 64}), TypeError,
         "config must be a PermuteConfig"),
        (lambda: unpermute(_B[0], _I, _W, num_tokens=4), ValueError, r"buf must be 2-D"),
        (lambda: unpermute(_B, _I[:5], _W, num_tokens=4), ValueError,
         "dst_idx has length 5 but buf has 6 rows"),
        (lambda: unpermute(_B, _I, _W[:5], num_tokens=4), ValueError,
         "weights has length 5 but buf has 6 rows"),
        (lambda: unpermute(_B, _I, _W[None], num_tokens=4), ValueError, "weights must be 1-D"),
        (lambda: unpermute(_B, _I, _I, num_tokens=4), TypeError,
         "weights must have a floating dtype"),
        (lambda: unpermute(_B, _I, _W, num_tokens=-1), ValueError,
         r"num_tokens=-1 is out of range"),
        (lambda: unpermute(_B, _I, _W, num_tokens=4.0), TypeError,
         "num_tokens must be a static Python int, got 4.0"),
        (lambda: unpermute_reference(_B, _I.astype(jnp.int8), _W, num_tokens=4), TypeError,
         "dst_idx must have dtype int32, got int8"),
    ],
)
def test_invalid_arguments(call, exc, match):
  with pytest.raises(exc, match=match):
    call()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"block_d": 96}, ValueError, "PermuteConfig.block_d=96 must be a positive power of two"),
        ({"block_rows": 0}, ValueError,
         "PermuteConfig.block_rows=0 must be a positive power of two"),
        ({"num_warps": 3}, ValueError, "PermuteConfig.num_warps=3"),
        ({"num_warps": 64}, ValueError,
         r"PermuteConfig.num_warps=64 is too many; valid: <= 32 \(1024 threads per block"),
        ({"block_rows": 8.0}, TypeError, "PermuteConfig.block_rows must be an int"),
    ],
)
def test_invalid_config(kwargs, exc, match):
  with pytest.raises(exc, match=match):
    PermuteConfig(**kwargs)


def test_config_is_static_and_tiles_clip():
  cfg = PermuteConfig(block_rows=32, block_d=512)
  assert hash(cfg) == hash(PermuteConfig(block_rows=32, block_d=512))
  with pytest.raises(AttributeError):
    cfg.block_d = 64  # frozen
  assert cfg.tile(5, 200) == (8, 256)
  assert cfg.tile(1000, 4096) == (32, 512)


@pytest.mark.parametrize("gpu", ["h100", "h200", "b200"])
def test_for_target_fits_the_register_file(gpu):
  """Tile elements per thread <= registers per thread / 4 (tests/test_kernel_limits.py
  compiles these for H100 and H200 and checks that ptxas does not spill)."""
  for d in (2048, 7168):
    assert PermuteConfig.for_target(d, gpu) == PermuteConfig(16, 512, 4)
    assert PermuteConfig().check(d, gpu) == PermuteConfig()  # the default fits
  assert PermuteConfig.for_target(100, gpu) == PermuteConfig(16, 128, 4)  # clipped to D
  # 255 registers per thread up to 8 warps; 65,536 per block share more threads beyond.
  widest = {1: 64, 2: 64, 4: 64, 8: 64, 16: 32, 32: 16}
  for warps, elements in widest.items():
    config = PermuteConfig.for_target(7168, gpu, num_warps=warps)
    assert config.elements_per_thread(7168) == elements, (warps, config)
    wider = PermuteConfig(16, 2 * config.block_d, warps)
    with pytest.raises(ValueError, match=f"is {2 * elements} elements per thread over "
                                         f"{32 * warps} threads; valid: <= {elements} "):
      wider.check(7168, gpu)


def test_limit_errors_name_the_value():
  with pytest.raises(ValueError, match=re.escape(
      "PermuteConfig(block_rows=16, block_d=1024, num_warps=4) does not fit h100 at d=7168: its "
      "16 x 1024 tile is 128 elements per thread over 128 threads; valid: <= 64 (256 registers "
      "per thread / 4 per element), beyond which ptxas spills the tile to local memory. "
      "PermuteConfig.for_target(d=7168, gpu='h100') picks a block_d that fits")):
    PermuteConfig(block_d=1024).check(7168, "h100")
  with pytest.raises(ValueError, match=r"block_rows=16384 is too many for h200 at num_warps=4; "
                                       r"valid: <= 8192"):
    PermuteConfig.for_target(2048, "h200", block_rows=16384)
  with pytest.raises(ValueError, match=r"gpu='a100' is invalid: must be one of \('h100'"):
    PermuteConfig.for_target(2048, "a100")
  with pytest.raises(ValueError, match=r"d=0 is out of range; valid: >= 1"):
    PermuteConfig().check(0, "h200")


# ------------------------------------------------------- CUDA export (no GPU)

EXPORT_T, EXPORT_D, EXPORT_S = 8192, 4096, 2 * 8192
TRITON_CALL = "__gpu$xla.gpu.triton"  # Pallas Triton custom-call target in jaxlib 0.10
CUDA_MAX_GRID_YZ = 65535


def _export_cuda(fn, *args):
  return jax.export.export(
      jax.jit(fn),
      platforms=["cuda"],
      # Triton IR is not a stable custom call, so export refuses it by default.
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
  )(*args)


def _shapes(exported):
  return [(a.shape, a.dtype) for a in exported.out_avals]


def _check_triton_launches(exported, num_kernels):
  text = exported.mlir_module()
  assert exported.platforms == ("cuda",)
  assert text.count(f"stablehlo.custom_call @{TRITON_CALL}") == num_kernels
  grids = re.findall(r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) : i32", text)
  assert len(grids) == num_kernels
  for gx, gy, gz in map(lambda g: tuple(map(int, g)), grids):
    assert 0 < gx < 2**31 and 0 < gy <= CUDA_MAX_GRID_YZ and 0 < gz <= CUDA_MAX_GRID_YZ


@pytest.mark.parametrize("dtype", DTYPES)
def test_export_permute_cuda(dtype):
  sds = jax.ShapeDtypeStruct

  def fwd_and_vjp(x_TD, src_S, dbuf_SD):
    buf_SD, vjp = jax.vjp(lambda x: permute(x, src_S, interpret=False), x_TD)
    return buf_SD, vjp(dbuf_SD)[0]

  exported = _export_cuda(
      fwd_and_vjp,
      sds((EXPORT_T, EXPORT_D), dtype), sds((EXPORT_S,), jnp.int32),
      sds((EXPORT_S, EXPORT_D), dtype),
  )
  assert _shapes(exported) == [((EXPORT_S, EXPORT_D), dtype), ((EXPORT_T, EXPORT_D), dtype)]
  _check_triton_launches(exported, num_kernels=2)  # permute + unpermute (its VJP)


@pytest.mark.parametrize("dtype", DTYPES)
def test_export_unpermute_cuda(dtype):
  sds = jax.ShapeDtypeStruct

  def fwd_and_vjp(buf_SD, dst_S, w_S, dy_TD):
    fn = functools.partial(unpermute, num_tokens=EXPORT_T, interpret=False)
    y_TD, vjp = jax.vjp(lambda b, w: fn(b, dst_S, w), buf_SD, w_S)
    return (y_TD, *vjp(dy_TD))

  exported = _export_cuda(
      fwd_and_vjp,
      sds((EXPORT_S, EXPORT_D), dtype), sds((EXPORT_S,), jnp.int32),
      sds((EXPORT_S,), jnp.float32), sds((EXPORT_T, EXPORT_D), dtype),
  )
  assert _shapes(exported) == [
      ((EXPORT_T, EXPORT_D), dtype), ((EXPORT_S, EXPORT_D), dtype), ((EXPORT_S,), jnp.float32),
  ]
  _check_triton_launches(exported, num_kernels=2)  # unpermute + its fused backward
