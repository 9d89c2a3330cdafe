"""The Pallas permutation kernels and the XLA path follow one contract (`pallas_kernels.permute`).

Legend: T tokens, S slots (rows of the permuted buffer), D model dim.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hiermoe_jax as hm
from hiermoe_jax import permute as permute_lib
from helpers import assert_trees_close, loss_and_output, mesh_of, random_inputs, router_config

T, D = 13, 200


def top2_slots(key, num_tokens):
  """Every token in two slots (top-2 routing), shuffled, plus -1 and out-of-range padding."""
  ids_S = jnp.concatenate([jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), 2),
                           jnp.array([-1, -1, -3, num_tokens], jnp.int32)])
  return jax.random.permutation(key, ids_S)


def permute_and_unpermute(impl, x_TD, idx_S, w_S, rows_SD, dy_TD):
  """Both ops and their VJPs through `hiermoe_jax.permute`; `rows_SD` is unpermute's input
  and permute's cotangent."""
  buf_SD, vjp = jax.vjp(lambda x: permute_lib.permute(x, idx_S, impl=impl), x_TD)
  (dx_TD,) = vjp(rows_SD)
  y_TD, vjp = jax.vjp(
      lambda b, w: permute_lib.unpermute(b, idx_S, w, num_tokens=T, impl=impl), rows_SD, w_S)
  dbuf_SD, dw_S = vjp(dy_TD)
  return dict(buf=buf_SD, dx=dx_TD, y=y_TD, dbuf=dbuf_SD, dw=dw_S)


def contract_in_numpy(x_TD, idx_S, w_S, rows_SD, dy_TD):
  """The contract written out in numpy: f32 products and sums, one rounding to bf16.

  With at most two slots per token the summation order cannot change an f32 sum, so every
  result but `dw` is fixed to the bit. `dw` is returned exactly (f64; products of bf16 values
  are exact) with its f32 error bound: any summation order over D terms, plus the final rounding.
  """
  x, rows, dy = (np.asarray(a, np.float32) for a in (x_TD, rows_SD, dy_TD))
  w, idx = np.asarray(w_S, np.float32), np.asarray(idx_S)
  ok = (idx >= 0) & (idx < T)
  bf16 = lambda a: a.astype(jnp.bfloat16)  # noqa: E731  (round to nearest even, as XLA)
  buf = np.where(ok[:, None], x[np.where(ok, idx, 0)], 0)
  dx = np.zeros((T, D), np.float32)
  np.add.at(dx, idx[ok], rows[ok])
  y = np.zeros((T, D), np.float32)
  np.add.at(y, idx[ok], w[ok, None] * rows[ok])
  g = np.where(ok[:, None], dy[np.where(ok, idx, 0)], 0)  # dy gathered to the slots
  prod = g.astype(np.float64) * rows.astype(np.float64)
  dw_bound = (D + 1) * 2.0**-24 * np.abs(prod).sum(axis=1)
  fixed = dict(buf=bf16(buf), dx=bf16(dx), y=bf16(y), dbuf=bf16(w[:, None] * g))
  return fixed, prod.sum(axis=1), dw_bound


def test_contract_xla_equals_pallas_bf16_rows_f32_weights():
  kx, ki, kw, kr, ky = jax.random.split(jax.random.key(0), 5)
  x_TD = jax.random.normal(kx, (T, D), jnp.float32).astype(jnp.bfloat16)
  idx_S = top2_slots(ki, T)
  w_S = jax.random.uniform(kw, idx_S.shape, jnp.float32, 0.1, 1.0)
  rows_SD = jax.random.normal(kr, (idx_S.shape[0], D), jnp.float32).astype(jnp.bfloat16)
  dy_TD = jax.random.normal(ky, (T, D), jnp.float32).astype(jnp.bfloat16)
  args = (x_TD, idx_S, w_S, rows_SD, dy_TD)
  results = {impl: permute_and_unpermute(impl, *args) for impl in ("xla", "pallas")}
  fixed, dw_exact, dw_bound = contract_in_numpy(*args)

  for impl, res in results.items():
    for name, want in fixed.items():
      assert res[name].dtype == jnp.bfloat16, (impl, name, res[name].dtype)
      np.testing.assert_array_equal(np.asarray(res[name]), want, err_msg=f"{impl} {name}")
    assert res["dw"].dtype == jnp.float32, (impl, res["dw"].dtype)
    err = np.abs(np.asarray(res["dw"], np.float64) - dw_exact)
    assert (err <= dw_bound).all(), (impl, float((err / dw_bound).max()))
  # Not vacuous: the old XLA path (w * rows in bf16, then an f32 sum) gives other bits.
  idx, ok = np.asarray(idx_S), (np.asarray(idx_S) >= 0) & (np.asarray(idx_S) < T)
  contrib = (np.asarray(w_S.astype(jnp.bfloat16)[:, None] * rows_SD, np.float32))
  old_y = np.zeros((T, D), np.float32)
  np.add.at(old_y, idx[ok], contrib[ok])
  assert (old_y.astype(jnp.bfloat16) != fixed["y"]).any()


def test_unknown_impl_is_refused():
  x_TD, idx_S = jnp.ones((3, 4)), jnp.zeros((3,), jnp.int32)
  with pytest.raises(ValueError, match=r"impl='cuda' is not one of \('xla', 'pallas'\)"):
    permute_lib.permute(x_TD, idx_S, impl="cuda")
  with pytest.raises(ValueError, match="impl='cuda'"):
    permute_lib.unpermute(x_TD, idx_S, jnp.ones(3), num_tokens=3, impl="cuda")


@pytest.mark.parametrize("strategy", ["flat", "hier_dedup"])
def test_pallas_permute_equals_xla(strategy):
  mesh = mesh_of("2x4")
  results = []
  for impl in ("xla", "pallas"):
    config = router_config("sigmoid_grouped", dispatch=strategy, permute_impl=impl,
                           dropless=False, capacity_factor=1.0)
    params, x, placement, bias = random_inputs(config, mesh, seed=11)
    cot = jax.random.normal(jax.random.key(3), x.shape)
    run = jax.jit(loss_and_output(
        lambda p, x: hm.moe_apply(p, x, config=config, mesh=mesh, placement=placement,
                                  router_bias=bias)[0], cot))
    results.append(run(params, x))
  assert_trees_close(results[1], results[0])
