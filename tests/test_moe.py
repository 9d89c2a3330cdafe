"""moe_apply against the dense float32 reference: outputs and gradients.

Every strategy, both routers (with shared experts), several mesh shapes, random
non-identity placements; plus capacity drops checked against a brute-force
simulation, and the edge cases.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hiermoe_jax as hm
from hiermoe_jax.config import STRATEGIES
from helpers import (assert_trees_close, bruteforce_kept, check_against_reference, mesh_of,
                     random_inputs, router_config)


@pytest.mark.parametrize("mesh_name", ["2x4", "4x2", "1x8", "8x1"])
@pytest.mark.parametrize("router", ["softmax", "sigmoid_grouped"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_reference(strategy, router, mesh_name):
  check_against_reference(router_config(router, dispatch=strategy), mesh_of(mesh_name))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_single_device_mesh(strategy):
  check_against_reference(router_config("softmax", dispatch=strategy), mesh_of("1x1"))


@pytest.mark.parametrize("expert_compute", ["ragged_dot"])
def test_ragged_dot_expert_compute(expert_compute):
  config = router_config("softmax", dispatch="hier_dedup", expert_compute=expert_compute)
  check_against_reference(config, mesh_of("2x4"))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("router", ["softmax", "sigmoid_grouped"])
def test_drops_match_bruteforce(strategy, router):
  """With a small capacity factor, drops are the brute-force ones and outputs match."""
  mesh, tokens = mesh_of("2x4"), 16
  config = router_config(router, dispatch=strategy, dropless=False, capacity_factor=0.5)
  kept_fn = bruteforce_kept(config, mesh, tokens)
  params, x, placement, bias = random_inputs(config, mesh, tokens_per_device=tokens, seed=3)
  _, aux = jax.jit(lambda p, x: hm.moe_apply(p, x, config=config, mesh=mesh,
                                             placement=placement, router_bias=bias))(params, x)
  _, sim = kept_fn(params, x, placement, bias)
  assert {k: int(v) for k, v in aux.dropped_by_stage.items()} == sim["dropped"]
  assert int(aux.dropped) == sum(sim["dropped"].values()) > 0
  check_against_reference(config, mesh, tokens_per_device=tokens, seed=3,
                           kept_fn=lambda *a: kept_fn(*a)[0])


def test_dropless_never_drops_on_skewed_routing():
  """All tokens to the same experts: dropless still drops nothing."""
  mesh = mesh_of("2x4")
  for strategy in STRATEGIES:
    config = router_config("softmax", dispatch=strategy)
    params, x, _, _ = random_inputs(config, mesh)
    params["router"]["kernel"] = jnp.zeros_like(params["router"]["kernel"]).at[:, :4].set(5.0)
    x = jnp.abs(x)  # positive features: experts 0-3 win for every token
    y, aux = hm.moe_apply(params, x, config=config, mesh=mesh)
    assert int(aux.dropped) == 0
    assert int(aux.expert_counts[:4].sum()) == x.shape[0] * config.top_k
    assert_trees_close(y, hm.reference_moe(params, x, config))


@pytest.mark.parametrize("strategy", ["flat", "hier_dedup"])
def test_top_k_equals_num_experts(strategy):
  config = router_config("softmax", dispatch=strategy, num_experts=8, top_k=8)
  check_against_reference(config, mesh_of("2x4"))


@pytest.mark.parametrize("strategy", ["flat", "hier_dedup"])
def test_one_token_per_device(strategy):
  config = router_config("sigmoid_grouped", dispatch=strategy)
  check_against_reference(config, mesh_of("2x4"), tokens_per_device=1)


def test_batched_input_shape_and_dtype():
  mesh = mesh_of("2x4")
  config = router_config("softmax", dispatch="hier_dedup", dtype="bfloat16")
  params, x, _, _ = random_inputs(config, mesh)
  x3 = x.reshape(8, 8, 16).astype(jnp.bfloat16)
  y, _ = hm.moe_apply(params, x3, config=config, mesh=mesh)
  assert y.shape == x3.shape and y.dtype == jnp.bfloat16
  ref = hm.reference_moe(params, x3.astype(jnp.float32), config)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), atol=0.08, rtol=0.05)


def test_aux_losses_and_counts():
  mesh = mesh_of("2x4")
  config = router_config("softmax", load_balance_weight=0.01, z_loss_weight=0.001)
  params, x, placement, _ = random_inputs(config, mesh)
  _, aux = hm.moe_apply(params, x, config=config, mesh=mesh, placement=placement)
  routing = hm.reference.reference_routing(params, x, config)
  counts = np.bincount(np.asarray(routing.ids_TK).ravel(), minlength=16)
  np.testing.assert_array_equal(np.asarray(aux.expert_counts), counts)
  f = counts / counts.sum()
  p = np.asarray(routing.probs_TE).mean(0)
  np.testing.assert_allclose(float(aux.load_balance_loss), 16 * np.sum(f * p), rtol=1e-5)
  logits = np.asarray(x, np.float64) @ np.asarray(params["router"]["kernel"], np.float64)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(float(aux.z_loss), np.mean(lse ** 2), rtol=1e-5)
  np.testing.assert_allclose(float(aux.aux_loss),
                             0.01 * float(aux.load_balance_loss) + 0.001 * float(aux.z_loss),
                             rtol=1e-6)
  assert aux.strategy == "flat"


def test_invalid_inputs_have_clear_errors():
  mesh = mesh_of("2x4")
  config = router_config("softmax")
  params, x, _, _ = random_inputs(config, mesh)
  with pytest.raises(ValueError, match="tokens.*multiple of 8"):
    hm.moe_apply(params, x[:12], config=config, mesh=mesh)
  with pytest.raises(ValueError, match="d_model=16"):
    hm.moe_apply(params, x[:, :8], config=config, mesh=mesh)
  with pytest.raises(ValueError, match="not a permutation"):
    hm.moe_apply(params, x, config=config, mesh=mesh, placement=jnp.zeros(16, jnp.int32))
  with pytest.raises(ValueError,
                     match="num_experts=12 is invalid: must be a multiple of the 8 devices"):
    hm.init_params(jax.random.key(0), config.replace(num_experts=12, top_k=2), mesh)


def test_a_traced_placement_that_is_not_a_permutation_poisons_the_output():
  """Under jit the placement cannot be checked before tracing: the output is NaN
  and aux.placement_ok says why, never a plausible wrong answer."""
  mesh = mesh_of("2x4")
  config = router_config("softmax", dispatch="hier_dedup")
  params, x, placement, _ = random_inputs(config, mesh)
  run = jax.jit(lambda placement: hm.moe_apply(params, x, config=config, mesh=mesh,
                                               placement=placement))
  y, aux = run(placement)
  assert bool(aux.placement_ok) and np.isfinite(np.asarray(y)).all()
  y, aux = run(placement.at[0].set(placement[1]))  # a slot repeated, another missing
  assert not bool(aux.placement_ok) and np.isnan(np.asarray(y)).all()


def test_placement_may_be_a_list():
  mesh = mesh_of("2x4")
  config = router_config("softmax")
  params, x, placement, _ = random_inputs(config, mesh)
  y_list, _ = hm.moe_apply(params, x, config=config, mesh=mesh, placement=placement.tolist())
  y_array, _ = hm.moe_apply(params, x, config=config, mesh=mesh, placement=placement)
  np.testing.assert_array_equal(np.asarray(y_list), np.asarray(y_array))


def test_params_and_router_bias_of_another_config_are_clear_errors():
  mesh = mesh_of("2x4")
  config = router_config("sigmoid_grouped")
  params, x, _, bias = random_inputs(config, mesh)
  other = config.replace(d_ff=20)  # same experts, another width: must not run silently
  with pytest.raises(ValueError, match=r"params\['experts'\]\['gate'\] has shape"):
    hm.moe_apply(params, x, config=other, mesh=mesh, router_bias=bias)
  with pytest.raises(ValueError, match="router_bias"):
    hm.moe_apply(params, x, config=config, mesh=mesh, router_bias=bias[:8])
  y_list, _ = hm.moe_apply(params, x, config=config, mesh=mesh, router_bias=bias.tolist())
  y, _ = hm.moe_apply(params, x, config=config, mesh=mesh, router_bias=bias)
  np.testing.assert_array_equal(np.asarray(y_list), np.asarray(y))
