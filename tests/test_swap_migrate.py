"""Expert migration: a swap is a relabelling, moved point to point (no all-gather)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermoe_jax as hm
from hiermoe_jax import mesh as mesh_lib
from hiermoe_jax.mesh import MeshShape
from hiermoe_jax.swap import migrate, plan_moves
from tests.helpers import mesh_of

E = 16


def small_config(**overrides):
  return hm.MoEConfig(**{"d_model": 16, "d_ff": 24, "num_experts": E, "top_k": 4,
                         "dropless": True, "dispatch": "hier_dedup", **overrides})


def host(tree):
  return jax.tree.map(np.asarray, tree)


def placements(seed):
  rng = np.random.default_rng(seed)
  return rng.permutation(E).astype(np.int32), rng.permutation(E).astype(np.int32)


def test_plan_moves_rounds():
  shape = MeshShape(2, 4)  # 2 slots per device
  ident = np.arange(E)

  def swap(*pairs):
    p = ident.copy()
    for i, j in pairs:
      p[[i, j]] = p[[j, i]]
    return p

  one = plan_moves(ident, swap((1, 10)), shape)
  # Slot 1 = device 0 local 1, slot 10 = device 5 local 0: one round, both ways.
  assert one.rounds == ((((5, 0), (0, 5)), (1, -1, -1, -1, -1, 0, -1, -1),
                         (1, -1, -1, -1, -1, 0, -1, -1)),)
  assert one.moved_slots == 2
  # Disjoint swaps on distinct devices share one round; a device in two swaps needs two.
  assert len(plan_moves(ident, swap((0, 2), (4, 12), (7, 15)), shape).rounds) == 1
  assert len(plan_moves(ident, swap((0, 2), (1, 4)), shape).rounds) == 2
  # A swap inside one device is a local gather, no communication.
  local = plan_moves(ident, swap((6, 7)), shape)
  assert local.rounds == () and local.local_src[3] == (1, 0) and local.moved_slots == 2
  assert plan_moves(ident, ident, shape).moved_slots == 0


def test_migrate_is_a_relabelling():
  mesh = mesh_of("2x4")
  config = small_config()
  params = hm.init_params(jax.random.key(0), config, mesh)
  old, new = placements(1)
  x = jax.random.normal(jax.random.key(1), (64, config.d_model))
  apply = jax.jit(lambda p, placement: hm.moe_apply(p, x, config=config, mesh=mesh,
                                                    placement=placement)[0])
  y_old = apply(params, jnp.asarray(old))
  before = host(params)
  moved = migrate(params, old, new, mesh)
  assert params["experts"]["gate"].is_deleted()  # donated
  y_new = apply(moved, jnp.asarray(new))
  np.testing.assert_allclose(np.asarray(y_new), np.asarray(y_old), rtol=1e-6, atol=1e-6)
  src = np.argsort(old)[new]
  for name, stack in moved["experts"].items():
    np.testing.assert_array_equal(np.asarray(stack), before["experts"][name][src])
    assert stack.sharding.is_equivalent_to(
        mesh_lib.named(mesh, mesh_lib.sharded_rows(stack.ndim)), stack.ndim)
  np.testing.assert_array_equal(np.asarray(moved["router"]["kernel"]), before["router"]["kernel"])


def test_optimizer_state_moves_with_params():
  mesh = mesh_of("2x4")
  config = small_config()
  params = hm.init_params(jax.random.key(2), config, mesh)
  x = jax.random.normal(jax.random.key(3), (64, config.d_model))
  old, new = placements(4)
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: jnp.sum(hm.moe_apply(p, x, config=config, mesh=mesh,
                                                    placement=jnp.asarray(old))[0] ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = step(params, opt_state)  # non-zero mu / nu
  before = host((params, opt_state))
  moved_params, moved_state = migrate((params, opt_state), old, new, mesh)
  src = np.argsort(old)[new]
  adam_before, adam_after = before[1][0], moved_state[0]
  for field in ("mu", "nu"):
    for name in ("gate", "up", "down"):
      got = np.asarray(getattr(adam_after, field)["experts"][name])
      want = getattr(adam_before, field)["experts"][name]
      assert np.abs(want).max() > 0
      np.testing.assert_array_equal(got, want[src])
    np.testing.assert_array_equal(np.asarray(getattr(adam_after, field)["router"]["kernel"]),
                                  getattr(adam_before, field)["router"]["kernel"])
  assert int(adam_after.count) == int(adam_before.count)
  for name in ("gate", "up", "down"):
    np.testing.assert_array_equal(np.asarray(moved_params["experts"][name]),
                                  before[0]["experts"][name][src])


def test_no_all_gather_in_compiled_migration():
  mesh = mesh_of("2x4")
  config = small_config()
  params = hm.init_params(jax.random.key(5), config, mesh)
  old, new = placements(6)
  hlo = jax.jit(lambda p: migrate(p, old, new, mesh)).lower(params).compile().as_text()
  assert "all-gather" not in hlo
  assert "all-to-all" not in hlo
  assert "collective-permute" in hlo


def test_identity_and_bad_sharding():
  mesh = mesh_of("2x4")
  config = small_config()
  params = hm.init_params(jax.random.key(7), config, mesh)
  ident = np.arange(E)
  assert migrate(params, ident, ident, mesh) is params
  replicated = jax.device_put(params["experts"]["gate"],
                              mesh_lib.named(mesh, mesh_lib.replicated()))
  with pytest.raises(ValueError, match="sharding"):
    migrate({"experts": {"gate": replicated}}, ident, ident[::-1].copy(), mesh)
  with pytest.raises(ValueError, match="permutation"):
    migrate(params, ident, np.zeros(E, int), mesh)


def test_training_with_swaps_every_step_matches_training_without():
  """search + migrate after every AdamW step: same losses, same logical weights."""
  from hiermoe_jax import cost, routing
  from hiermoe_jax.swap import SearchConfig, search

  mesh = mesh_of("2x4")
  shape = MeshShape(2, 4)
  config = small_config()
  tokens_per_device = 8
  keys = jax.random.split(jax.random.key(8), 3)
  params0 = hm.init_params(keys[0], config, mesh)
  xs = jax.random.normal(keys[1], (4, shape.devices * tokens_per_device, config.d_model))
  targets = jax.random.normal(keys[2], xs.shape)
  tx = optax.adamw(3e-2)
  search_config = SearchConfig(profile=cost.load_profile("paper_a6000"), d_model=config.d_model,
                               d_ff=config.d_ff, migration=False, max_pairs=2)

  @jax.jit
  def step(params, opt_state, placement, x, target):
    def loss_fn(p):
      y, aux = hm.moe_apply(p, x, config=config, mesh=mesh, placement=placement)
      return jnp.mean((y - target) ** 2) + aux.aux_loss
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    logits = x @ params["router"]["kernel"]
    ids = routing.route(logits, config).ids_TK
    return optax.apply_updates(params, updates), opt_state, loss, ids

  def train(swaps: bool):
    params = jax.tree.map(jnp.copy, params0)
    opt_state = tx.init(params)
    placement = np.arange(E, dtype=np.int32)
    losses, moves = [], 0
    for x, target in zip(xs, targets):
      params, opt_state, loss, ids = step(params, opt_state, jnp.asarray(placement), x, target)
      losses.append(float(loss))
      if swaps:
        ids_ATK = np.asarray(ids).reshape(shape.devices, tokens_per_device, config.top_k)
        plan = search(ids_ATK, placement, shape, search_config)
        if plan.changed:
          params, opt_state = migrate((params, opt_state), placement, plan.placement, mesh)
          placement, moves = plan.placement, moves + len(plan.pairs)
    logical = np.argsort(placement)  # logical expert e sits in slot logical[e]
    experts = {k: np.asarray(v)[logical] for k, v in params["experts"].items()}
    return losses, experts, moves

  plain_losses, plain_experts, _ = train(swaps=False)
  swap_losses, swap_experts, moves = train(swaps=True)
  assert moves >= 2
  np.testing.assert_allclose(swap_losses, plain_losses, rtol=1e-5)
  for name in plain_experts:
    np.testing.assert_allclose(swap_experts[name], plain_experts[name], rtol=1e-5, atol=1e-6)


def test_migrate_many_rejects_a_leaf_selected_twice_before_moving_anything():
  from hiermoe_jax.swap.migrate import migrate_many
  mesh = mesh_of("2x4")
  params = hm.init_params(jax.random.key(9), small_config(), mesh)
  old, new = placements(10)
  with pytest.raises(ValueError, match=r"\['experts'\]\['down'\] is selected by moves 0 and 1"):
    migrate_many(params, [(old, new, None), (new, old, None)], mesh)
  assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(params))
