"""Capacity drops do not depend on the placement, the chunking or the strategy.

The decision is taken before dispatch (dispatch/keep.py): per device, per logical
expert, the first C pairs in token order. Checked on skewed routing that really
drops: a permuted placement equals the identity one, chunked equals unchunked,
and every strategy equals the dense reference with the brute-force keep mask.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hiermoe_jax as hm
from hiermoe_jax import cost, traffic
from hiermoe_jax.config import STRATEGIES as ENGINE_STRATEGIES
from hiermoe_jax.dispatch import auto, registry
from hiermoe_jax.dispatch.base import Strategy
from hiermoe_jax.dispatch.keep import apply_keep, pair_capacity
from hiermoe_jax.mesh import MeshShape
from bruteforce import keep_first
from helpers import assert_trees_close, mesh_of, random_inputs, router_config

STRATEGIES = ("flat", "flat_dedup", "hier", "hier_dedup", "auto")
TOKENS = 16  # per device


def _config(strategy, capacity_factor, chunks=1):
  return router_config("softmax", dispatch=strategy, dropless=False,
                       capacity_factor=capacity_factor, overlap_chunks=chunks)


def _inputs(config, mesh):
  """Params in logical expert order, x, a random placement and a cotangent. A shared
  offset in x and a router boost towards experts 0-3 skew the routing."""
  params, x, placement, _ = random_inputs(config, mesh, tokens_per_device=TOKENS, seed=11)
  params["router"]["kernel"] = params["router"]["kernel"].at[:, :4].add(0.15)
  cot = jax.random.normal(jax.random.key(5), x.shape)
  return params, x + 1.0, placement, cot


@functools.cache
def _runner(config, mesh):
  """jit of (params, x, placement, cot) -> ((loss, (y, aux)), grads wrt params and x).
  Params are logical; the expert stacks go in physically (slot s holds logical
  expert placement[s]), so gradients come back in logical order."""
  def loss(params, x, placement, cot):
    physical = dict(params, experts=jax.tree.map(lambda a: a[placement], params["experts"]))
    y, aux = hm.moe_apply(physical, x, config=config, mesh=mesh, placement=placement)
    return jnp.sum(y * cot), (y, aux)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _run(config, mesh, placement=None):
  params, x, random_placement, cot = _inputs(config, mesh)
  placement = random_placement if placement is None else placement
  (_, (y, aux)), grads = _runner(config, mesh)(params, x, placement, cot)
  return y, aux, grads


def _identity(config):
  return jnp.arange(config.num_experts, dtype=jnp.int32)


def _assert_drops_only_at_capacity(aux):
  stages = {k: int(v) for k, v in aux.dropped_by_stage.items()}
  assert stages["capacity"] > 0, stages  # the routing really drops
  assert all(v == 0 for k, v in stages.items() if k != "capacity"), stages
  assert int(aux.dropped) == stages["capacity"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_permuted_placement_equals_the_identity(strategy):
  """capacity_factor 1.0 here; 1.25 in the chunked test below."""
  mesh = mesh_of("2x4")
  config = _config(strategy, 1.0)
  y_id, aux_id, grads_id = _run(config, mesh, _identity(config))
  y, aux, grads = _run(config, mesh)
  _assert_drops_only_at_capacity(aux)
  assert int(aux.dropped) == int(aux_id.dropped)
  assert_trees_close(y, y_id)
  assert_trees_close(grads, grads_id)


@functools.cache
def _reference_runner(config):
  """jit of (params, x, kept, cot) -> ((loss, y), grads wrt params and x) of the dense
  reference with the kept pairs `kept`. The reference has no dispatch strategy: the
  strategies' tests share one program (config with dispatch='flat')."""
  def ref_loss(params, x, kept, cot):
    y = hm.reference_moe(params, x, config, kept_TK=kept)
    return jnp.sum(y * cot), y
  return jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1), has_aux=True))


def _assert_reference_pairs(config, mesh, y, aux, grads):
  """The kept pairs are the brute-force first C per (device, logical expert): y and
  the gradients equal the dense reference with exactly those pairs."""
  params, x, _, cot = _inputs(config, mesh)
  ids = np.asarray(hm.reference.reference_routing(params, x, config).ids_TK)
  cap = pair_capacity(tokens=TOKENS, top_k=config.top_k, num_experts=config.num_experts,
                      capacity_factor=config.capacity_factor, dropless=False)
  kept = jnp.asarray(np.array(keep_first(ids.reshape(8, TOKENS, -1).tolist(), cap))
                     .reshape(ids.shape))
  assert int(aux.dropped) == int(np.sum(~kept))
  (_, y_ref), grads_ref = _reference_runner(config.replace(dispatch="flat"))(
      params, x, kept, cot)
  assert_trees_close(y, y_ref)
  assert_trees_close(grads, grads_ref)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_chunked_and_permuted_equal_unchunked_identity_and_the_reference(strategy):
  """capacity_factor 1.25: every strategy drops the reference pairs; overlap_chunks=4
  with a random placement equals overlap_chunks=1 with the identity one (a random
  placement unchunked is the test above; 2 chunks add no case 4 does not:
  tests/test_overlap.py runs them dropless)."""
  mesh = mesh_of("2x4")
  config = _config(strategy, 1.25)
  y_id, aux_id, grads_id = _run(config, mesh, _identity(config))
  _assert_reference_pairs(config, mesh, y_id, aux_id, grads_id)
  y, aux, grads = _run(config.replace(overlap_chunks=4), mesh)
  _assert_drops_only_at_capacity(aux)
  assert int(aux.dropped) == int(aux_id.dropped)
  assert_trees_close(y, y_id)
  assert_trees_close(grads, grads_id)

def _routings(shape: MeshShape, experts: int, tokens: int, top_k: int, rng) -> dict:
  """[A, T, K] logical ids: uniform, every token on the same K experts, and every
  token's K experts on one device (the worst case for dedup buffers)."""
  per_device = experts // shape.devices
  uniform = np.stack([np.stack([rng.choice(experts, top_k, replace=False)
                                for _ in range(tokens)]) for _ in range(shape.devices)])
  hot = np.broadcast_to(np.arange(top_k), uniform.shape)
  one_device = np.stack([np.stack([(t % shape.devices) * per_device
                                   + rng.choice(per_device, top_k, replace=False)
                                   for t in range(tokens)]) for _ in range(shape.devices)])
  return {"uniform": uniform, "hot": hot, "one_device": one_device}


@pytest.mark.parametrize("mesh_shape", [(2, 4), (4, 2), (1, 8), (3, 2)])
def test_stage_buffers_never_drop_a_kept_pair(mesh_shape):
  """Host replay (the engine's rules): only the capacity decision drops, it drops the
  brute-force pairs, and the same for a random placement, at any chunking."""
  shape, tokens, top_k = MeshShape(*mesh_shape), 16, 3
  experts = 4 * shape.devices
  rng = np.random.default_rng(sum(mesh_shape))
  for kind, ids in _routings(shape, experts, tokens, top_k, rng).items():
    for capacity_factor in (0.5, 1.0, 1.25, 2.0):
      cap = pair_capacity(tokens=tokens, top_k=top_k, num_experts=experts,
                          capacity_factor=capacity_factor, dropless=False)
      expected = int(np.sum(~np.array(keep_first(ids.tolist(), cap))))
      for chunks in (1, 2, 4):
        run = functools.partial(traffic.stats, ids, mesh_shape=mesh_shape, num_experts=experts,
                                d_model=1, capacity_factor=capacity_factor, chunks=chunks)
        identity, permuted = run(), run(placement=rng.permutation(experts))
        for name in ENGINE_STRATEGIES:
          stages = identity[name]["dropped_by_stage"]
          where = (kind, capacity_factor, chunks, name)
          assert stages == {**dict.fromkeys(stages, 0), "capacity": expected}, where
          assert permuted[name]["dropped_by_stage"] == stages, where


def test_auto_prices_the_kept_pairs_only():
  """auto's live peaks, taken after the capacity decision, equal the host replay
  with capacity, for every strategy, one whose first hop is intra-node included."""
  mesh = mesh_of("2x4")
  shape, tokens, top_k, experts = MeshShape.of(mesh), 16, 3, 32
  ids = _routings(shape, experts, tokens, top_k, np.random.default_rng(2))["one_device"]
  ids = ids.astype(np.int32)
  cap = pair_capacity(tokens=tokens, top_k=top_k, num_experts=experts, capacity_factor=0.5,
                      dropless=False)
  registry.register(Strategy("intra_first_dedup", tiers=("intra", "inter"), dedup=True,
                             auto_candidate=False))
  try:
    host = traffic.stats(ids, mesh_shape=(2, 4), num_experts=experts, d_model=1,
                         capacity_factor=0.5)
    peaks = jax.jit(jax.shard_map(
        lambda s: auto.live_peaks(apply_keep(s[0], jnp.ones(s[0].shape), cap)[0], shape=shape,
                                  experts_per_device=experts // 8),
        mesh=mesh, in_specs=shape.rows(3), out_specs=jax.sharding.PartitionSpec()))(ids)
    for name in registry.names():
      assert host[name]["dropped_by_stage"]["capacity"] > 0
      assert tuple(int(v) for v in peaks[name]) == cost.peak_rows_per_hop(name, host[name]), name
  finally:
    registry.unregister("intra_first_dedup")
