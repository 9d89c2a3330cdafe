"""`auto`: live peaks equal the host statistics, the choice is the model's argmin,
and the output equals the reference whichever strategy runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hiermoe_jax as hm
from hiermoe_jax import cost, traffic
from hiermoe_jax.config import STRATEGIES
from hiermoe_jax.dispatch import auto
from hiermoe_jax.mesh import MeshShape, sharded_rows
from helpers import (assert_trees_close, check_against_reference, mesh_of, random_inputs,
                     router_config)


def _profile(tmp_path, name, inter_beta, intra_beta, flat_beta):
  path = tmp_path / f"{name}.json"
  stage = lambda b: {"alpha_ms": 0.0, "beta_ms_per_byte": b}
  path.write_text(json.dumps({"name": name, "flat": stage(flat_beta), "inter": stage(inter_beta),
                              "intra": stage(intra_beta)}))
  return str(path)


def _skewed_ids(seed=0):
  """Tokens favour node 0's experts, so dedup rates differ by tier."""
  rng = np.random.default_rng(seed)
  p = np.r_[np.full(8, 3.0), np.ones(8)]
  return np.stack([np.stack([rng.choice(16, 4, replace=False, p=p / p.sum())
                             for _ in range(32)]) for _ in range(8)]).astype(np.int32)


def test_live_peaks_equal_host_statistics():
  mesh = mesh_of("2x4")
  shape = MeshShape.of(mesh)
  ids = _skewed_ids()
  placement = np.random.default_rng(1).permutation(16)
  slots = np.argsort(placement)[ids]
  peaks = jax.jit(jax.shard_map(
      lambda s: auto.live_peaks(s.reshape(-1, 4), shape=shape, experts_per_device=2),
      mesh=mesh, in_specs=sharded_rows(2), out_specs=jax.sharding.PartitionSpec()))(
          jnp.asarray(slots.reshape(-1, 4)))
  host = traffic.stats(ids, mesh_shape=(2, 4), num_experts=16, placement=placement, d_model=4)
  for name in STRATEGIES:
    assert tuple(int(p) for p in peaks[name]) == cost.peak_rows_per_hop(name, host[name]), name


@pytest.mark.parametrize("betas, expected", [
    ((1e-3, 1e-9, 1e-3), "hier_dedup"),  # inter-node bytes dominate: dedup across nodes
    ((1e-9, 1e-9, 1e-9), None),          # every tier alike: whatever the model says
    ((1e-9, 1e-3, 1e-5), "flat_dedup"),  # intra-node bytes dominate: avoid the local hop
])
def test_auto_runs_the_model_argmin(tmp_path, betas, expected):
  mesh = mesh_of("2x4")
  path = _profile(tmp_path, "crafted", *betas)
  config = router_config("softmax", dispatch="auto", cost_profile=path, num_experts=16, top_k=4)
  params, x, placement, _ = random_inputs(config, mesh, tokens_per_device=32)
  y, aux = jax.jit(lambda p, x: hm.moe_apply(p, x, config=config, mesh=mesh,
                                             placement=placement))(params, x)
  routing = hm.reference.reference_routing(params, x, config)
  ids = np.asarray(routing.ids_TK).reshape(8, 32, 4)
  host = traffic.stats(ids, mesh_shape=(2, 4), num_experts=16, placement=np.asarray(placement),
                       d_model=16)
  profile = cost.load_profile(path)
  predicted = {n: cost.predict(n, host[n], profile, mesh_shape=(2, 4), d_model=16,
                               bytes_per_elem=4) for n in STRATEGIES}
  best = min(auto.candidates(MeshShape(2, 4), 4), key=lambda n: predicted[n])
  assert aux.strategy == "auto" and aux.strategy_ran() == best
  if expected:
    assert best == expected
  for n in STRATEGIES:
    assert float(aux.predicted_ms[n]) == pytest.approx(predicted[n], rel=1e-5)
  assert_trees_close(y, hm.reference_moe(params, x, config, placement=placement))


def test_auto_matches_reference_with_gradients():
  mesh = mesh_of("2x4")
  config = router_config("sigmoid_grouped", dispatch="auto")
  check_against_reference(config, mesh, seed=4)


def test_bad_cost_profile_is_a_clear_error_before_tracing():
  """The config reads no file; the profile is loaded where auto uses it, and a bad
  one is a one-line error naming the field, before anything is traced."""
  config = router_config("softmax", dispatch="auto", cost_profile="no_such_profile")
  mesh = mesh_of("2x4")
  params, x, _, _ = random_inputs(config, mesh)
  with pytest.raises(ValueError, match="MoEConfig.cost_profile='no_such_profile' is invalid: "
                                       "cost profile 'no_such_profile' is neither a shipped"):
    hm.moe_apply(params, x, config=config, mesh=mesh)


def test_candidates_are_the_strategies_the_model_can_prefer():
  assert auto.candidates(MeshShape(2, 4), 8) == ("flat_dedup", "hier_dedup")
  assert auto.candidates(MeshShape(2, 4), 1) == ("flat", "hier")
  assert auto.candidates(MeshShape(1, 8), 8) == ("flat_dedup",)
  assert auto.candidates(MeshShape(8, 1), 1) == ("flat",)


def test_single_tier_meshes_run_flat_without_deciding(tmp_path):
  """On 1x8 a hierarchical strategy is a flat one plus a local copy: never run,
  even with a profile that makes intra-node bytes look cheaper than flat ones."""
  mesh = mesh_of("1x8")
  path = _profile(tmp_path, "intra_cheap", 1e-3, 1e-9, 1e-6)
  config = router_config("softmax", dispatch="auto", cost_profile=path)
  params, x, placement, _ = random_inputs(config, mesh, tokens_per_device=16)
  y, aux = jax.jit(lambda p, x: hm.moe_apply(p, x, config=config, mesh=mesh,
                                             placement=placement))(params, x)
  assert aux.strategy_ran() == "flat_dedup" and aux.predicted_ms == {}
  assert_trees_close(y, hm.reference_moe(params, x, config, placement=placement))
