"""MoEConfig.overlap_chunks: the chunked block equals the unchunked one."""

from __future__ import annotations

import re

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


def _cross_chunk_overlaps(hlo: str) -> set[tuple[str, str]]:
  """(chunk of an async all-to-all, chunk of an expert matmul scheduled between its
  start and done) pairs, read from the scheduled entry computation."""
  lines = hlo[hlo.index("\nENTRY"):].split("\n")
  starts, pairs = {}, set()
  for i, line in enumerate(lines):
    start = re.search(r"%(all-to-all-start[.\d]*) = .*op_name=\"[^\"]*chunk(\d)/", line)
    if start:
      starts[start.group(1)] = (i, start.group(2))
    done = re.search(r"all-to-all-done\(%(all-to-all-start[.\d]*)\)", line)
    if done and done.group(1) in starts:
      first, chunk = starts.pop(done.group(1))
      pairs.update((chunk, m.group(1)) for between in lines[first + 1:i]
                   if (m := re.search(r"chunk(\d)/experts/expert_compute/[^\"]*dot_general",
                                      between)))
  return pairs


def test_gpu_program_overlaps_one_chunks_all_to_all_with_anothers_experts():
  """Compiled for 2 x 8 H200 without a GPU (hiermoe_jax.gpu_aot): XLA's scheduler
  runs an async all-to-all of one chunk across the expert matmuls of the other."""
  gpu_aot = pytest.importorskip("hiermoe_jax.gpu_aot")
  mesh = gpu_aot.mesh("h200", 2, 8)
  config = hm.MoEConfig(d_model=512, d_ff=512, num_experts=32, top_k=4, dispatch="hier_dedup",
                        dtype="bfloat16", overlap_chunks=2)
  spec = lambda shape, p: jax.ShapeDtypeStruct(  # noqa: E731
      shape, jnp.float32, sharding=jax.sharding.NamedSharding(mesh, p))
  params = jax.tree.map(spec, hm.params.param_shapes(config), hm.params.param_specs(config),
                        is_leaf=lambda a: isinstance(a, tuple))
  x = jax.ShapeDtypeStruct((16 * 512, 512), jnp.bfloat16, sharding=jax.sharding.NamedSharding(
      mesh, hm.mesh.sharded_rows(2)))
  loss = lambda p, x: jnp.sum(hm.moe_apply(p, x, config=config, mesh=mesh)[0]  # noqa: E731
                              .astype(jnp.float32))
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
  pairs = _cross_chunk_overlaps(hlo)
  assert {("0", "1"), ("1", "0")} & pairs, pairs
