"""Low-precision wire (MoEConfig.comm_dtype): the stated error bounds hold, the
gradients flow, and the block stays close to the full-precision wire."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hiermoe_jax as hm
from hiermoe_jax.dispatch import wire
from hiermoe_jax.errors import ConfigError
from helpers import mesh_of, random_inputs, router_config


def test_fp8_round_trip_meets_the_stated_bound():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 128)) * np.exp(rng.normal(size=(64, 1)) * 3)  # rows of many scales
  x[3] = 0.0  # an all-zero row
  x[5, :5] = 1e-9  # tiny values beside large ones reach the subnormals
  x = jnp.asarray(x, jnp.float32)
  packed = wire.quantize(x)
  assert packed.dtype == jnp.float8_e4m3fn and packed.shape == (64, 132)
  back = np.asarray(wire.dequantize(packed, jnp.float32))
  scale = np.max(np.abs(np.asarray(x)), axis=1, keepdims=True) / wire.FP8_MAX
  bound = np.maximum(2.0 ** -4 * np.abs(np.asarray(x)), 2.0 ** -10 * scale)
  assert np.all(np.abs(back - np.asarray(x)) <= bound * (1 + 1e-6))
  assert np.all(back[3] == 0)


@pytest.mark.parametrize("comm_dtype,rel_rms", [("bfloat16", 5e-3), (wire.FP8, 6e-2)])
@pytest.mark.parametrize("strategy", ["flat_dedup", "hier_dedup"])
def test_block_on_a_low_precision_wire_is_close_to_full_precision(strategy, comm_dtype, rel_rms):
  """Output and input gradient relative RMS error against the float32 wire; the
  bounds are what the per-row error (2**-9 for bf16, 2**-4 for fp8) allows
  after averaging over elements, with margin."""
  mesh = mesh_of("2x4")
  full = router_config("softmax", dispatch=strategy)
  low = full.replace(comm_dtype=comm_dtype)
  params, x, placement, bias = random_inputs(full, mesh, seed=2)

  def loss(config):
    def fn(x):
      y, _ = hm.moe_apply(params, x, config=config, mesh=mesh, placement=placement)
      return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(x)

  (_, y_full), g_full = loss(full)
  (_, y_low), g_low = loss(low)
  rel = lambda a, b: float(jnp.sqrt(jnp.mean((a - b) ** 2) / jnp.mean(b ** 2)))  # noqa: E731
  assert 0 < rel(y_low, y_full) < rel_rms
  assert 0 < rel(g_low, g_full) < rel_rms
  assert np.isfinite(np.asarray(g_low)).all()


def test_aux_counts_wire_bytes_by_dtype():
  mesh = mesh_of("2x4")
  config = router_config("softmax", dispatch="hier_dedup")
  params, x, _, _ = random_inputs(config, mesh)
  _, aux32 = hm.moe_apply(params, x, config=config, mesh=mesh)
  _, aux8 = hm.moe_apply(params, x, config=config.replace(comm_dtype=wire.FP8), mesh=mesh)
  d = config.d_model
  for link in ("inter", "intra"):
    rows = int(aux32.rows[link])
    assert int(aux8.rows[link]) == rows
    assert float(aux32.wire_bytes[link]) == rows * 2 * 4 * d  # f32 both ways
    assert float(aux8.wire_bytes[link]) == rows * ((d + 4) + 2 * d)  # fp8 + scale, bf16 back


def test_bad_wire_dtypes_are_clear_errors():
  with pytest.raises(ConfigError, match="MoEConfig.comm_dtype='int8' is invalid"):
    router_config("softmax", comm_dtype="int8")
  with pytest.raises(ConfigError, match="fp8 wire needs all_to_all='padded'"):
    router_config("softmax", comm_dtype=wire.FP8, all_to_all="ragged")


@pytest.mark.parametrize("comm_dtype,bits", [("bfloat16", "u16"), (wire.FP8, "u8")])
def test_low_precision_rows_cross_the_cpu_wire_in_their_own_bytes(comm_dtype, bits):
  """XLA:CPU widens bf16 / fp8 collectives to f32; the wire moves them as raw bits, so
  every wide [S, D] all-to-all of the compiled step (forward and backward) carries
  2- or 1-byte elements, and none carries f32 rows."""
  mesh = mesh_of("2x4")
  config = router_config("softmax", dispatch="hier_dedup").replace(comm_dtype=comm_dtype)
  params, x, _, _ = random_inputs(config, mesh)

  def loss(x):
    y, _ = hm.moe_apply(params, x, config=config, mesh=mesh)
    return jnp.sum(y ** 2)

  hlo = jax.jit(jax.grad(loss)).lower(x).compile().as_text()
  results = [line.split("all-to-all(")[0] for line in hlo.splitlines() if " all-to-all(" in line]
  width = config.d_model + (4 if comm_dtype == wire.FP8 else 0)  # fp8: + the row's scale
  rows = [r for r in results if f",{config.d_model}]" in r or f",{width}]" in r]
  assert rows and not any("f32[" in r for r in rows), rows
  assert any(f"{bits}[" in r and f",{width}]" in r for r in rows), rows  # the dispatch
