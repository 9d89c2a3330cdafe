"""SwapController: cadence, window, per-layer migration of params + optimizer state,
and a training loop driven by it that follows the trajectory without swaps."""

from __future__ import annotations

import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hiermoe_jax as hm
from hiermoe_jax import cost
from hiermoe_jax.bench import synthetic
from hiermoe_jax import mesh as mesh_lib
from hiermoe_jax.mesh import MeshShape
from hiermoe_jax.swap import SearchConfig, SwapController, experts_under, search
from tests.helpers import mesh_of

E, K, T = 16, 4, 8


def moe_config(**overrides):
  return hm.MoEConfig(**{"d_model": 16, "d_ff": 24, "num_experts": E, "top_k": K,
                         "dropless": True, "dispatch": "hier_dedup", **overrides})


def search_config(**overrides):
  config = moe_config()
  return SearchConfig(**{"profile": cost.load_profile("paper_a6000"), "d_model": config.d_model,
                         "d_ff": config.d_ff, "migration": False, "max_pairs": 2, **overrides})


def skewed_ids(seed, devices=8, tokens=T):
  return synthetic.routing("zipf:1.5", devices=devices, tokens=tokens, num_experts=E,
                           top_k=K, seed=seed)


def two_layer_state(mesh):
  """{"blocks": {0: {"ffn": {"params": ...}}, 1: ...}} and its AdamW state (mu, nu nonzero)."""
  config = moe_config()
  params = {"blocks": {i: {"ffn": {"params": hm.init_params(jax.random.key(i), config, mesh)}}
                       for i in range(2)}}
  tx = optax.adamw(1e-2)
  grads = jax.tree.map(lambda p: jnp.sin(p * 3.0 + 1.0), params)
  opt_state = tx.init(params)
  _, opt_state = tx.update(grads, opt_state, params)
  return params, opt_state


def host(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def test_window_and_cadence():
  mesh = mesh_of("2x4")
  controller = SwapController(search_config(), mesh, swap_interval=3, window=2)
  assert controller.window_ids(0) is None
  steps = [skewed_ids(s) for s in range(3)]
  for ids in steps:
    controller.observe(0, ids.reshape(-1, K))  # flat [N*G*T, K] as in MoEAux.topk_ids
  got = controller.window_ids(0)
  np.testing.assert_array_equal(got, np.concatenate(steps[1:], axis=1))  # last 2 steps
  assert [controller.due(s) for s in range(7)] == [False, False, False, True, False, False,
                                                   True]
  params, opt_state = two_layer_state(mesh)
  tree, placements, events = controller.maybe_swap(2, (params, opt_state), {0: np.arange(E)})
  assert events == [] and controller.decisions == 0 and tree[0] is params
  np.testing.assert_array_equal(placements[0], np.arange(E))


def test_windows_round_trip_through_a_checkpoint_form():
  """windows() -> restore_windows() on a fresh controller gives the same window, and
  a longer saved window keeps only the last `window` steps."""
  mesh = mesh_of("2x4")
  controller = SwapController(search_config(), mesh, swap_interval=2, window=3)
  steps = [skewed_ids(s) for s in range(4)]
  for ids in steps:
    controller.observe(0, ids.reshape(-1, K))
  saved = controller.windows()
  assert list(saved) == [0] and saved[0].shape == (3, *steps[0].shape)
  fresh = SwapController(search_config(), mesh, swap_interval=2, window=3)
  fresh.restore_windows(saved)
  np.testing.assert_array_equal(fresh.window_ids(0), controller.window_ids(0))
  shorter = SwapController(search_config(), mesh, swap_interval=2, window=2)
  shorter.restore_windows(saved)
  np.testing.assert_array_equal(shorter.window_ids(0), np.concatenate(steps[2:], axis=1))


def test_swaps_one_layer_params_and_optimizer_state():
  """Layer 0 observed (skewed): its experts and their Adam moments move exactly as the
  plan says; layer 1 (not observed) and every non-expert leaf stay bit for bit."""
  mesh = mesh_of("2x4")
  controller = SwapController(search_config(), mesh, swap_interval=2,
                              expert_path=lambda layer: ("blocks", layer, "ffn"))
  ids = [skewed_ids(10), skewed_ids(11)]
  for step_ids in ids:
    controller.observe(0, jnp.asarray(step_ids.reshape(-1, K)))
  ident = np.arange(E, dtype=np.int32)
  expected = search(np.concatenate(ids, axis=1), ident, MeshShape(2, 4),
                    search_config(window_steps=2))  # gains per step of the 2-step window
  assert expected.changed  # the skewed window has a paying swap

  params, opt_state = two_layer_state(mesh)
  before = host((params, opt_state))
  tree, placements, events = controller.maybe_swap(2, (params, opt_state),
                                                   {0: ident, 1: ident})
  np.testing.assert_array_equal(placements[0], expected.placement)
  np.testing.assert_array_equal(placements[1], ident)
  (event,) = events
  assert event["layer"] == 0 and event["pairs"] == [list(p) for p in expected.pairs]
  assert event["predicted_gain_ms"] == pytest.approx(expected.gain_ms)
  assert event["bytes_moved"] == expected.bytes_to_move > 0 and event["time_s"] > 0
  assert controller.decisions == 1 and controller.swaps == len(expected.pairs)

  src = expected.placement  # old placement is the identity: new slot s <- old slot src[s]
  layer0 = experts_under(("blocks", 0, "ffn"), E)
  moved = 0
  flat_after = jax.tree_util.tree_flatten_with_path(tree)[0]
  flat_before = jax.tree_util.tree_leaves(before)
  for (path, after), old in zip(flat_after, flat_before):
    if layer0(path, after):
      moved += 1
      np.testing.assert_array_equal(np.asarray(after), old[src])
    else:
      np.testing.assert_array_equal(np.asarray(after), old)
  assert moved == 9  # gate, up, down in params, mu and nu


def test_training_with_controller_matches_training_without():
  """DESIGN invariant 3 through the controller: same losses with swaps every 2 steps
  (migration priced at 0, so any predicted gain is taken)."""
  mesh = mesh_of("2x4")
  config = moe_config()
  keys = jax.random.split(jax.random.key(3), 3)
  params0 = hm.init_params(keys[0], config, mesh)
  xs = jax.random.normal(keys[1], (6, 8 * T, config.d_model))
  targets = jax.random.normal(keys[2], xs.shape)
  tx = optax.adamw(3e-2)

  @jax.jit
  def step(params, opt_state, placement, x, target):
    def loss_fn(p):
      y, aux = hm.moe_apply(p, x, config=config, mesh=mesh, placement=placement)
      return jnp.mean((y - target) ** 2) + aux.aux_loss, aux.topk_ids
    (loss, ids), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, ids

  def train(controller):
    params, placement = jax.tree.map(jnp.copy, params0), np.arange(E, dtype=np.int32)
    opt_state = tx.init(params)
    losses, events = [], []
    for n, (x, target) in enumerate(zip(xs, targets)):
      params, opt_state, loss, ids = step(params, opt_state, jnp.asarray(placement), x, target)
      losses.append(float(loss))
      if controller is not None:
        controller.observe("moe", ids)
        (params, opt_state), placements, new = controller.maybe_swap(
            n + 1, (params, opt_state), {"moe": placement})
        placement, events = placements["moe"], events + new
    return losses, events, placement

  plain, _, _ = train(None)
  swapped, events, placement = train(SwapController(search_config(), mesh, swap_interval=2))
  assert events and not np.array_equal(placement, np.arange(E))
  np.testing.assert_allclose(swapped, plain, rtol=1e-5)


def layer_outputs(params, placements, x):
  """Each layer's MoE output on x under its placement (the logical function)."""
  return [np.asarray(hm.moe_apply(params["blocks"][i]["ffn"]["params"], x, config=moe_config(),
                                  mesh=mesh_of("2x4"), placement=jnp.asarray(placements[i]))[0])
          for i in range(2)]


def test_swaps_are_all_or_nothing(monkeypatch):
  """Issue #8: a migration that fails leaves params, optimizer state and placements
  as they were, and usable; a successful one moves both layers together and keeps
  the function each layer computes (placement and weights stay a consistent pair)."""
  from hiermoe_jax.swap.controller import SwapError
  migrate_lib = importlib.import_module("hiermoe_jax.swap.migrate")  # swap.migrate: the function

  mesh = mesh_of("2x4")
  controller = SwapController(search_config(), mesh, swap_interval=1,
                              expert_path=lambda layer: ("blocks", layer, "ffn"))
  for layer in range(2):
    controller.observe(layer, skewed_ids(20 + layer))
  params, opt_state = two_layer_state(mesh)
  ident = np.arange(E, dtype=np.int32)
  placements = {0: ident, 1: ident.copy()}
  x = jax.random.normal(jax.random.key(9), (8 * T, moe_config().d_model))
  before, y_before = host((params, opt_state)), layer_outputs(params, placements, x)

  def boom(*args, **kwargs):
    raise RuntimeError("injected")

  calls = {"move_tables": 0}
  real_move_tables, real_device_migrate = migrate_lib.move_tables, migrate_lib._device_migrate

  def plan_layer_1_fails(*args):  # layer 0 is planned fine, layer 1 fails
    calls["move_tables"] += 1
    return boom() if calls["move_tables"] == 2 else real_move_tables(*args)

  def intact():
    for leaf in jax.tree_util.tree_leaves((params, opt_state)):
      assert not leaf.is_deleted()
    for got, want in zip(jax.tree_util.tree_leaves((params, opt_state)),
                         jax.tree_util.tree_leaves(before)):
      np.testing.assert_array_equal(np.asarray(got), want)
    assert all(np.array_equal(p, ident) for p in placements.values())

  # On the host (layer 1's move plan) and while tracing the migration program.
  for name, patch in [("move_tables", plan_layer_1_fails), ("_device_migrate", boom)]:
    with monkeypatch.context() as m:
      m.setattr(migrate_lib, name, patch)
      migrate_lib._compiled.cache_clear()
      with pytest.raises(SwapError, match="before any expert moved .*RuntimeError: injected"):
        controller.maybe_swap(1, (params, opt_state), placements)
    intact()
  migrate_lib._compiled.cache_clear()
  assert controller.swaps == 0

  (new_params, new_opt), new_placements, events = controller.maybe_swap(
      1, (params, opt_state), placements)
  assert sorted(e["layer"] for e in events) == [0, 1]
  assert all(not np.array_equal(new_placements[i], ident) for i in range(2))
  for got, want in zip(layer_outputs(new_params, new_placements, x), y_before):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

  # A failure of the running program consumes the donated leaves, and says so.
  def fails_when_run(leaves, tables, **kw):  # pure_callback: no effect token left failing
    zero = jax.pure_callback(boom, jax.ShapeDtypeStruct((), leaves[0].dtype))
    return real_device_migrate([leaves[0] + zero, *leaves[1:]], tables, **kw)

  controller.observe(0, skewed_ids(30))
  controller.observe(1, skewed_ids(31))
  with monkeypatch.context() as m:
    m.setattr(migrate_lib, "_device_migrate", fails_when_run)
    migrate_lib._compiled.cache_clear()
    with pytest.raises(SwapError, match="experts .*consumed: resume from the last checkpoint"):
      controller.maybe_swap(2, (new_params, new_opt), new_placements)
  migrate_lib._compiled.cache_clear()
  # JAX keeps each device's last host-callback token and re-raises a failed one at
  # every effects barrier (and at exit): replace them with a good one on every device.
  def good(v):
    return v + jax.pure_callback(lambda: np.float32(0), jax.ShapeDtypeStruct((), jnp.float32))
  on_every_device = mesh_lib.named(mesh, mesh_lib.sharded_rows(1))
  jax.jit(good)(jax.device_put(np.zeros(8, np.float32), on_every_device)).block_until_ready()
  jax.effects_barrier()


def test_prices_swaps_with_measured_migration_over_the_interval():
  """A swap is taken when gain per step x swap_interval exceeds the measured migration
  time, declined when not; each migration run updates the measured price."""
  mesh = mesh_of("2x4")
  ids = [skewed_ids(40), skewed_ids(41)]
  ident = np.arange(E, dtype=np.int32)
  plan = search(np.concatenate(ids, axis=1), ident, MeshShape(2, 4),
                search_config(max_pairs=1, migration=True, slice_ms=0.0, window_steps=2))
  assert plan.changed and plan.gain_ms > 0
  interval = 5
  # Just too dear / just cheap enough: 2 slices per pair against gain x interval.
  pays_ms = plan.gain_ms * interval / 2
  for slice_ms, taken in ((1.01 * pays_ms, False), (0.99 * pays_ms, True)):
    controller = SwapController(search_config(max_pairs=1, migration=True), mesh,
                                swap_interval=interval, expert_path=lambda layer: ())
    controller.slice_ms = slice_ms  # as measured by an earlier migration
    for step_ids in ids:
      controller.observe(0, step_ids)
    params = hm.init_params(jax.random.key(3), moe_config(), mesh)
    tree, placements, events = controller.maybe_swap(interval, params, {0: ident})
    assert controller.decisions == 1 and bool(events) == taken
    if not taken:
      assert tree is params and controller.migrations == [] and controller.slice_ms == slice_ms
      continue
    (event,) = events
    assert event["priced_by"] == "measured"
    assert event["predicted_migration_ms"] == pytest.approx(2 * slice_ms)
    (run,) = controller.migrations
    assert run["slices"] == 2 and run["ms"] > 0 and event["migration_ms"] == run["ms"]
    # The next decisions are priced by the average of old and measured ms per slice.
    assert controller.slice_ms == pytest.approx(0.5 * slice_ms + 0.5 * run["ms"] / 2)


def test_calibrate_prices_a_slice_and_keeps_the_state():
  """The probe swaps slots 0 and E-1 of every layer and back: same values, a measured
  price, and the program it compiled serves the next decision."""
  migrate_lib = importlib.import_module("hiermoe_jax.swap.migrate")
  mesh = mesh_of("2x4")
  controller = SwapController(search_config(migration=True), mesh, swap_interval=2,
                              expert_path=lambda layer: ("blocks", layer, "ffn"))
  tree = two_layer_state(mesh)
  before = host(tree)
  ident = np.arange(E, dtype=np.int32)
  migrate_lib._compiled.cache_clear()  # an earlier test in this worker may hold the program
  compiles = migrate_lib.stats.compiles
  tree = controller.calibrate(tree, {0: ident, 1: ident})
  for got, want in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(before)):
    np.testing.assert_array_equal(np.asarray(got), want)
  assert controller.slice_ms > 0 and migrate_lib.stats.compiles == compiles + 1
  controller.slice_ms = 0.0  # so the skewed window's swap is taken
  for layer in range(2):
    controller.observe(layer, skewed_ids(60 + layer))
  _, _, events = controller.maybe_swap(2, tree, {0: ident, 1: ident})
  assert events and migrate_lib.stats.compiles == compiles + 1


def test_decisions_are_deterministic():
  """Same window, same measured price: the same plan on every run (as on every
  process); the search is numpy with no randomness."""
  mesh = mesh_of("2x4")
  window = np.concatenate([skewed_ids(s) for s in range(50, 53)], axis=1)
  plans = []
  for _ in range(2):
    controller = SwapController(search_config(max_pairs=3, migration=True), mesh,
                                swap_interval=4, window=3)
    controller.slice_ms = 0.0
    for step_ids in np.split(window, 3, axis=1):
      controller.observe(0, step_ids.copy())
    plans.append(controller.plan(0, np.arange(E)))
  assert plans[0].changed and plans[0].pairs == plans[1].pairs
  np.testing.assert_array_equal(plans[0].placement, plans[1].placement)
  assert plans[0].gain_ms == plans[1].gain_ms


def test_interval_adapts_to_gain_over_migration():
  """Adaptive (max_interval): priced over max_interval steps; the next decision
  comes after the taken plan's break-even steps (within [swap_interval,
  max_interval]) and doubles when nothing pays."""
  mesh = mesh_of("2x4")
  ids = [skewed_ids(40), skewed_ids(41)]
  ident = np.arange(E, dtype=np.int32)
  plan = search(np.concatenate(ids, axis=1), ident, MeshShape(2, 4),
                search_config(max_pairs=1, migration=True, slice_ms=0.0, window_steps=2))
  # Migration of one pair (2 slices) paid back after `break_even` steps.
  for break_even, interval in ((0.5, 2), (6.5, 7), (20.0, 4)):
    controller = SwapController(search_config(max_pairs=1, migration=True), mesh,
                                swap_interval=2, max_interval=16, expert_path=lambda layer: ())
    controller.slice_ms = break_even * plan.gain_ms / 2
    for step_ids in ids:
      controller.observe(0, step_ids)
    assert not controller.due(1) and controller.due(2)
    params = hm.init_params(jax.random.key(3), moe_config(), mesh)
    _, _, events = controller.maybe_swap(2, params, {0: ident})
    assert bool(events) == (break_even < 16) and controller.intervals == [(2, interval)]
    assert not controller.due(1 + interval) and controller.due(2 + interval)
  # Nothing pays again: the interval keeps doubling up to max_interval.
  for step, interval in ((6, 8), (14, 16), (30, 16)):
    controller.maybe_swap(step, params, {0: ident})
    assert controller.intervals[-1] == (step, interval)
  with pytest.raises(ValueError, match="max_interval=1"):
    SwapController(search_config(), mesh, swap_interval=2, max_interval=1)
  # The schedule a checkpoint carries: a fresh controller decides when this one would.
  resumed = SwapController(search_config(max_pairs=1, migration=True), mesh,
                           swap_interval=2, max_interval=16, expert_path=lambda layer: ())
  resumed.restore_schedule(json.loads(json.dumps(controller.schedule())))
  assert resumed.schedule() == controller.schedule() == {
      "interval": 16, "next_decision": 46, "slice_ms": controller.slice_ms}
  assert not resumed.due(45) and resumed.due(46)
  narrower = SwapController(search_config(), mesh, swap_interval=2, max_interval=8)
  narrower.restore_schedule(controller.schedule())
  assert narrower.interval == 8  # clamped to the resumed run's max_interval


def test_group_plan_moves_params_and_optimizer_state():
  """4x2 mesh, routing by groups of co-selected experts: the controller takes the
  co-location plan and moves every expert leaf (params, Adam moments) as it says."""
  mesh = mesh_of("4x2")
  group = np.random.default_rng(0).integers(0, 4, size=(8, T))
  ids = np.stack([group + 4 * k for k in range(4)], axis=-1)
  controller = SwapController(search_config(max_pairs=2, migration=True, group_plans=True),
                              mesh, swap_interval=1, expert_path=lambda layer: ())
  controller.slice_ms = 0.0
  controller.observe(0, ids)
  params = hm.init_params(jax.random.key(5), moe_config(), mesh)
  tree = (params, optax.adam(1e-3).init(params))
  tree = jax.tree.map(lambda x: x + 1.0, tree)  # nonzero moments
  before = host(tree)
  tree, placements, (event,) = controller.maybe_swap(1, tree, {0: np.arange(E)})
  assert event["kind"] == "colocate" and event["pairs"] == [] and event["slices"] == 12
  new = placements[0]  # from the identity: slot s takes old slot new[s]
  node_of = np.argsort(new) // 4
  assert all(len(set(node_of[[g, g + 4, g + 8, g + 12]])) == 1 for g in range(4))
  assert controller.migrations[0]["slices"] == 12
  expert = experts_under((), E)
  moved = 0
  for (path, after), old in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                                jax.tree_util.tree_leaves(before)):
    moved += expert(path, after)
    np.testing.assert_array_equal(np.asarray(after), old[new] if expert(path, after) else old)
  assert moved == 9  # gate, up, down in params, mu and nu


def test_rejects_bad_arguments():
  mesh = mesh_of("2x4")
  with pytest.raises(ValueError, match="swap_interval=0"):
    SwapController(search_config(), mesh, swap_interval=0)
  with pytest.raises(ValueError, match="window=0"):
    SwapController(search_config(), mesh, swap_interval=2, window=0)
  controller = SwapController(search_config(), mesh, swap_interval=1,
                              expert_path=lambda layer: ("nowhere", layer))
  controller.observe(0, skewed_ids(1))
  params, opt_state = two_layer_state(mesh)
  with pytest.raises(ValueError, match="no expert leaf under path"):
    controller.maybe_swap(1, (params, opt_state), {0: np.arange(E)})


def test_experts_under_matches_consecutive_keys():
  from jax.tree_util import DictKey, GetAttrKey, SequenceKey
  leaf = np.zeros((E, 2))
  mu_path = (SequenceKey(0), GetAttrKey("mu"), DictKey("blocks"), DictKey(1), DictKey("ffn"),
             DictKey("params"), DictKey("experts"), DictKey("gate"), GetAttrKey("value"))
  assert experts_under(("blocks", 1, "ffn"), E)(mu_path, leaf)
  assert not experts_under(("blocks", 0, "ffn"), E)(mu_path, leaf)
  assert not experts_under(("blocks", 1, "ffn"), E)(mu_path, np.zeros((E + 1, 2)))
  router = mu_path[:5] + (DictKey("params"), DictKey("router"), DictKey("kernel"))
  assert not experts_under(("blocks", 1, "ffn"), E)(router, leaf)
  assert experts_under((), E)(mu_path, leaf)


def test_bench_swap_routing_and_report(tmp_path):
  """The drifting Zipf generator is deterministic and skewed; a tiny bench run writes
  the report with before / after / speedup / migration."""
  import json

  from hiermoe_jax.bench import swap as bench_swap
  kwargs = dict(devices=8, tokens=32, num_experts=E, top_k=K, alpha=1.2, steps=3, seed=5)
  a, b = bench_swap.drifting_routing(**kwargs), bench_swap.drifting_routing(**kwargs)
  assert len(a) == 3 and all(x.shape == (8, 32, K) and x.dtype == np.int32 for x in a)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert all((np.sort(x, -1)[..., 1:] != np.sort(x, -1)[..., :-1]).all() for x in a)  # distinct
  counts = np.bincount(a[0].ravel(), minlength=E)
  assert counts.max() > 2 * counts.mean()  # skewed
  assert not np.array_equal(a[0], a[1])

  path = tmp_path / "swap.json"
  code = bench_swap.main(["--mesh", "2x4", "--experts", str(E), "--topk", str(K), "--tokens",
                          "32", "--hidden", "16", "--steps", "4", "--swap-interval", "2",
                          "--repeats", "2", "--warmup", "1", "--no-migration-cost",
                          "--json", str(path)])
  assert code == 0
  report = json.loads(path.read_text())
  for name in ("before", "after"):
    assert report[name]["time_ms"] > 0 and report[name]["max_over_mean_rows"] >= 1.0
  assert report["speedup"] > 0
  migration = report["migration"]
  assert migration["decisions"] == 2 and migration["bytes"] > 0 and migration["ms"] > 0
  assert migration["compiles"] >= 1 and migration["pairs"] == sum(
      len(e["pairs"]) for e in report["events"])
  for event in report["events"]:
    assert event["predicted_gain_ms"] > 0 and np.isfinite(event["measured_gain_ms"])


def test_trainer_calibrates_before_step_one():
  """models.train_loop.calibrate_swaps on a scanned model ([L, E] placement, the stack
  moved in place; the unrolled write-back is test_train's): the state keeps every
  value, a slice is priced, and the program it compiled serves the first decision."""
  import pathlib

  from models.config import load_config
  from models.steps import Model
  from models.train_loop import _swap, calibrate_swaps, run_mesh, swap_controller
  migrate_lib = importlib.import_module("hiermoe_jax.swap.migrate")
  cfg = load_config(pathlib.Path(__file__).parents[1] / "configs" / "tiny.yaml", [
      "mesh.nodes=2", "mesh.local=4", "model.d_model=16", "model.n_heads=2", "model.d_ff=32",
      "model.n_layers=2", "moe.num_experts=8", "moe.d_ff=8", "moe.top_k=2",
      "train.swap_interval=1", "model.scan_layers=true"])
  model = Model(cfg, run_mesh(cfg))
  controller = swap_controller(cfg, model)
  assert list(controller.stacks.values()) == [tuple(model.moe_layers)]  # one [L, E] key
  state = model.init_state()
  before = host((state.params, state.opt_state, state.buffers))
  compiles = migrate_lib.stats.compiles
  state = calibrate_swaps(model, controller, state)
  after = (state.params, state.opt_state, state.buffers)
  for got, want in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(before)):
    np.testing.assert_array_equal(np.asarray(got), want)
  compiled = migrate_lib.stats.compiles  # one more, or none if an earlier test compiled it
  assert controller.slice_ms > 0 and compiled - compiles <= 1
  controller.slice_ms = 0.0  # any predicted gain pays
  ids = [synthetic.routing("zipf:1.5", devices=8, tokens=T, num_experts=8, top_k=2, seed=layer)
         for layer in model.moe_layers]
  state, events = _swap(model, controller, 1, state, ids)
  assert events and migrate_lib.stats.compiles == compiled
