"""Expert migration: a swap is a relabelling, moved point to point (no all-gather)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import importlib

import hiermoe_jax as hm
from hiermoe_jax import mesh as mesh_lib
from hiermoe_jax.mesh import MeshShape
from hiermoe_jax.swap import experts_under, migrate, migrate_many, move_tables
from hiermoe_jax.swap.migrate import device_pairs
from jax.sharding import PartitionSpec as P
from tests.helpers import mesh_of

E = 16
migrate_lib = importlib.import_module("hiermoe_jax.swap.migrate")  # swap.migrate: the function


def small_config(**overrides):
  return hm.MoEConfig(**{"d_model": 16, "d_ff": 24, "num_experts": E, "top_k": 4,
                         "dropless": True, "dispatch": "hier_dedup", **overrides})


def host(tree):
  return jax.tree.map(np.asarray, tree)


def placements(seed):
  rng = np.random.default_rng(seed)
  return rng.permutation(E).astype(np.int32), rng.permutation(E).astype(np.int32)


def swapped(placement, *pairs):
  p = np.array(placement)
  for i, j in pairs:
    p[[i, j]] = p[[j, i]]
  return p


def test_move_tables():
  shape = MeshShape(2, 4)  # 2 slots per device, 28 device pairs
  ident = np.arange(E)
  pairs = device_pairs(8)
  one = move_tables(ident, swapped(ident, (1, 10)), shape)
  # Slot 1 = device 0 row 1, slot 10 = device 5 row 0: pair (0, 5) exchanges once.
  q = pairs.index((0, 5))
  assert one.moved == 2 and one.count.tolist() == [int(i == q) for i in range(28)]
  assert one.send[q, 0].tolist() == [1, 0] and one.recv[q, 0].tolist() == [1, 0]
  assert (one.recv[:, 1:] == -1).all()
  # Two swaps between the same devices: two iterations of that pair only.
  two = move_tables(ident, swapped(ident, (0, 2), (1, 3)), shape)
  assert two.count[pairs.index((0, 1))] == 2 and two.count.sum() == 2
  # A swap inside one device is a local gather, no communication.
  local = move_tables(ident, swapped(ident, (6, 7)), shape)
  assert local.count.sum() == 0 and local.local_src[3].tolist() == [1, 0]
  assert move_tables(ident, ident, shape).moved == 0
  # Scanned [L, E]: rows are (layer, slot) flattened; each layer its own change.
  layered = move_tables(np.stack([ident, ident]),
                        np.stack([ident, swapped(ident, (1, 10))]), shape)
  assert layered.send[q, 0].tolist() == [3, 2] and layered.count.sum() == 1


def expert_stacks(mesh, layers, seed):
  """A scanned-style tree: params and two Adam-like moments, [L, E, ...] stacks."""
  rng = np.random.default_rng(seed)
  spec = P(None, *mesh_lib.sharded_rows(2))
  def stack(*shape):
    return jax.device_put(rng.standard_normal(shape).astype(np.float32),
                          mesh_lib.named(mesh, spec if len(shape) == 4 else
                                         mesh_lib.sharded_rows(len(shape))))
  def copy():
    return {"experts": {"gate": stack(layers, E, 4, 6), "down": stack(layers, E, 6, 4)}}
  return {"params": copy(), "mu": copy(), "nu": copy()}


def test_one_compilation_serves_every_decision_scanned_and_unrolled():
  mesh = mesh_of("2x4")
  layers, rng = 3, np.random.default_rng(11)
  placement = np.stack([np.arange(E)] * layers)
  tree = expert_stacks(mesh, layers, 12)
  migrate_lib._compiled.cache_clear()  # count from no program, whatever ran before
  compiles = migrate_lib.stats.compiles
  decisions = [swapped(placement[0], (0, 15)),  # one pair
               rng.permutation(E),  # every slot moves
               swapped(placement[0], (2, 3))]  # local only
  for n, change in enumerate(decisions):
    new = placement.copy()
    new[n % layers] = change[np.argsort(np.arange(E))]
    new[(n + 1) % layers] = rng.permutation(E)
    before = host(tree)
    tree = migrate(tree, placement, new, mesh)
    for l in range(layers):
      src = np.argsort(placement[l])[new[l]]
      for copy in ("params", "mu", "nu"):
        for name, leaf in tree[copy]["experts"].items():
          np.testing.assert_array_equal(np.asarray(leaf)[l],
                                        before[copy]["experts"][name][l][src])
    placement = new
  assert migrate_lib.stats.compiles == compiles + 1
  # Unrolled [E, ...] stacks, one change per layer in one call: one more program, reused.
  flat = {l: {"experts": {"w": jax.device_put(
      rng.standard_normal((E, 5)).astype(np.float32),
      mesh_lib.named(mesh, mesh_lib.sharded_rows(2)))}} for l in range(2)}
  ident = np.arange(E)
  for seed in (1, 2):
    new = [np.random.default_rng(seed + l).permutation(E) for l in range(2)]
    before = host(flat)
    flat = migrate_many(flat, [(ident, new[l], experts_under((l,), E)) for l in range(2)], mesh)
    for l in range(2):
      np.testing.assert_array_equal(np.asarray(flat[l]["experts"]["w"]),
                                    before[l]["experts"]["w"][np.argsort(ident)[new[l]]])
    ident = None  # the next decision starts from `new`
    flat = migrate_many(flat, [(new[l], np.arange(E), experts_under((l,), E))
                               for l in range(2)], mesh)
    np.testing.assert_array_equal(np.asarray(flat[0]["experts"]["w"]),
                                  before[0]["experts"]["w"])
    ident = np.arange(E)
  assert migrate_lib.stats.compiles == compiles + 2


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
