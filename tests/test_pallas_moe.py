"""The MoE block with the Pallas permutation kernels equals the XLA path."""

import jax
import pytest

import hiermoe_jax as hm
from helpers import assert_trees_close, loss_and_output, mesh_of, random_inputs, router_config


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
