"""MoEConfig.overlap_chunks: the chunked block equals the unchunked one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import hiermoe_jax as hm
from helpers import assert_trees_close, mesh_of, random_inputs, router_config


def _value_and_grads(config, mesh, params, x, placement, bias):
  cot = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)

  def loss(params, x):
    y, aux = hm.moe_apply(params, x, config=config, mesh=mesh, placement=placement,
                          router_bias=bias)
    return jnp.sum(y * cot), (y, aux.rows, aux.dropped)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)


@pytest.mark.parametrize("strategy", ["flat", "flat_dedup", "hier", "hier_dedup", "auto"])
def test_chunked_equals_unchunked_dropless(strategy):
  mesh = mesh_of("2x4")
  config = router_config("sigmoid_grouped", dispatch=strategy)
  params, x, placement, bias = random_inputs(config, mesh, tokens_per_device=16)
  (_, (y1, rows1, dropped1)), g1 = _value_and_grads(config, mesh, params, x, placement, bias)
  chunked = config.replace(overlap_chunks=4)
  (_, (y4, rows4, dropped4)), g4 = _value_and_grads(chunked, mesh, params, x, placement, bias)
  assert_trees_close(y4, y1)
  assert_trees_close(g4, g1)
  assert int(dropped1) == int(dropped4) == 0
  # Dedup is per chunk here as well: a token's rows do not depend on its chunk.
  assert {k: int(v) for k, v in rows4.items()} == {k: int(v) for k, v in rows1.items()}


def test_chunks_must_split_the_tokens():
  mesh = mesh_of("2x4")
  config = router_config("softmax", overlap_chunks=3)
  params, x, _, _ = random_inputs(config, mesh, tokens_per_device=8)
  with pytest.raises(ValueError, match="overlap_chunks=3 cannot split evenly"):
    hm.moe_apply(params, x, config=config, mesh=mesh)
