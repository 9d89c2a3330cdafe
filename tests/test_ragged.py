"""The ragged all-to-all path: CUDA lowering checked by export, CPU falls back."""

import jax
import jax.numpy as jnp
import pytest
from jax import export

import hiermoe_jax as hm
from hiermoe_jax.dispatch import exchange, get_strategy
from hiermoe_jax.dispatch.capacity import capacities
from hiermoe_jax.mesh import MeshShape, sharded_rows
from helpers import assert_trees_close, mesh_of, random_inputs, router_config


@pytest.mark.parametrize("strategy", ["flat", "hier_dedup"])
def test_ragged_path_exports_for_cuda(strategy):
  mesh = mesh_of("2x4")
  shape, experts, tokens, top_k, d = MeshShape.of(mesh), 16, 32, 4, 64
  caps = capacities(get_strategy(strategy), tokens=tokens, top_k=top_k, num_experts=experts,
                    shape=shape, capacity_factor=1.25, dropless=False)
  layout = exchange.Layout(shape, experts, ragged=True)

  def device_fn(x, slots, w):
    rows, _, row_w, handle = exchange.dispatch(x, slots, w, get_strategy(strategy),
                                               capacities=caps.hops, layout=layout)
    # Stand-in experts: one weighted vector per row, like pre-reduce.
    return exchange.combine(rows * jnp.sum(row_w, -1, keepdims=True).astype(rows.dtype), handle)

  spec = sharded_rows(2)
  fn = jax.shard_map(device_fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
  loss = lambda x, slots, w: jnp.sum(fn(x, slots, w) ** 2)
  args = (jax.ShapeDtypeStruct((8 * tokens, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((8 * tokens, top_k), jnp.int32),
          jax.ShapeDtypeStruct((8 * tokens, top_k), jnp.float32))
  # ragged_all_to_all lowers to a custom call without a serialization-stability
  # guarantee; we check the CUDA lowering, not long-term storage, so allow it.
  allow = [export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
  for f in (fn, jax.grad(loss, argnums=(0, 2))):
    exported = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=allow)(*args)
    text = exported.mlir_module()
    assert "ragged_all_to_all" in text and exported.platforms == ("cuda",)


def test_cpu_falls_back_to_padded_with_a_warning():
  mesh = mesh_of("2x4")
  config = router_config("softmax", dispatch="hier_dedup", all_to_all="ragged")
  params, x, placement, _ = random_inputs(config, mesh)
  with pytest.warns(UserWarning, match="not implemented on XLA:CPU; using the padded"):
    y, _ = hm.moe_apply(params, x, config=config, mesh=mesh, placement=placement)
  assert_trees_close(y, hm.reference_moe(params, x, config, placement=placement))
