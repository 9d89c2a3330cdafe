"""Expert-swap search: incremental loads vs recounts, objective, decisions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hiermoe_jax import cost, traffic
from hiermoe_jax.mesh import MeshShape
from hiermoe_jax.swap.search import (SearchConfig, migration_ms, placement_time_ms,
                                     predicted_time_ms, search,
                                     smooth_max, stage_loads, swap_objectives, swapped_loads)

PROFILE = cost.load_profile("paper_a6000")


def random_ids(shape, tokens, top_k, num_experts, seed, skew=0.0):
  """[N*G, T, K] distinct logical ids per token; skew > 0 favours low expert ids."""
  rng = np.random.default_rng(seed)
  p = np.exp(-skew * np.arange(num_experts))
  p /= p.sum()
  return np.stack([np.stack([rng.choice(num_experts, top_k, replace=False, p=p)
                             for _ in range(tokens)]) for _ in range(shape[0] * shape[1])])


def loop_loads(ids, placement, shape):
  """Brute force: L1 [N*G, N] and L2 [G, N*G] by walking every token."""
  nodes, local = shape
  devices = nodes * local
  per_device = len(placement) // devices
  slot_of = np.argsort(placement)
  l1 = np.zeros((devices, nodes), int)
  l2 = np.zeros((local, devices), int)
  for src in range(devices):
    for token in ids[src]:
      dests = {int(slot_of[e]) // per_device for e in token}
      for n in {d // local for d in dests}:
        if n != src // local:
          l1[src, n] += 1
      for d in dests:
        if d % local != src % local:
          l2[src % local, d] += 1
  return l1, l2


def swapped(placement, i, j):
  out = np.array(placement)
  out[[i, j]] = out[[j, i]]
  return out


def config(**overrides):
  return SearchConfig(**{"profile": PROFILE, "d_model": 32, "d_ff": 48, **overrides})


@pytest.mark.parametrize("shape", [(2, 4), (4, 2), (1, 4), (4, 1)])
def test_stage_loads_match_bruteforce_and_traffic(shape):
  ids = random_ids(shape, 12, 3, 16, seed=1, skew=0.2)
  placement = np.random.default_rng(2).permutation(16)
  l1, l2 = stage_loads(ids, placement, shape)
  e1, e2 = loop_loads(ids, placement, shape)
  np.testing.assert_array_equal(l1, e1)
  np.testing.assert_array_equal(l2, e2)
  # Same rows as the exchange-engine replay of hier_dedup (self entries excluded).
  mesh_shape = MeshShape(*shape)
  hops = traffic.simulate(np.argsort(placement)[ids], "hier_dedup", mesh_shape, 16)["hops"]
  sent1 = hops[0]["sent"]
  sent1[np.arange(mesh_shape.devices), np.arange(mesh_shape.devices) // shape[1]] = 0
  np.testing.assert_array_equal(l1, sent1)
  receiver, peer = np.indices(hops[1]["sent"].shape)
  sent2 = np.zeros_like(l2)
  sent2[receiver % shape[1], (receiver // shape[1]) * shape[1] + peer] = hops[1]["sent"]
  sent2[receiver % shape[1], receiver] = 0
  np.testing.assert_array_equal(l2, sent2)


@pytest.mark.parametrize("shape,num_experts", [((2, 4), 16), ((4, 2), 8), ((2, 2), 12)])
def test_incremental_loads_equal_recount_for_every_pair(shape, num_experts):
  ids = random_ids(shape, 10, 3, num_experts, seed=3, skew=0.3)
  placement = np.random.default_rng(4).permutation(num_experts)
  for i in range(num_experts):
    for j in range(num_experts):
      got = swapped_loads(ids, placement, shape, i, j)
      want = loop_loads(ids, swapped(placement, i, j), shape)
      np.testing.assert_array_equal(got[0], want[0], err_msg=f"stage 1, pair {(i, j)}")
      np.testing.assert_array_equal(got[1], want[1], err_msg=f"stage 2, pair {(i, j)}")


def test_objective_is_smoothed_cost_model():
  """The search ranks by the cost model with smooth peaks; a plan reports (and
  predicted_time_ms gives) the cost model with the exact peaks."""
  shape = (2, 4)
  ids = random_ids(shape, 16, 4, 16, seed=5, skew=0.2)
  placement = np.random.default_rng(6).permutation(16)
  cfg = config(compute_ms_per_pair=1e-3, exact_peaks=True)
  l1, l2 = loop_loads(ids, placement, shape)
  pairs_per_device = np.bincount(np.argsort(placement)[ids].ravel() // 2, minlength=8)
  for peak, got in ((smooth_max, swap_objectives(ids, placement, shape, cfg)[0]),
                    (np.max, predicted_time_ms(ids, placement, shape, cfg))):
    comm = cost.predict_from_peak_rows("hier_dedup", (peak(l1), peak(l2)), PROFILE,
                                       MeshShape(*shape), cfg.d_model, cfg.bytes_per_elem)
    want = comm + cfg.compute_ms_per_pair * peak(pairs_per_device)
    np.testing.assert_allclose(got, want, rtol=1e-12)
  # The smooth max tends to the max as g grows, and is the g-norm.
  x = np.array([3.0, 7.0, 7.0, 1.0])
  np.testing.assert_allclose(smooth_max(x, 10), np.sum(x ** 10) ** 0.1)
  assert 7.0 < smooth_max(x, 10) < smooth_max(x, 5)


@pytest.mark.parametrize("compute_ms", [0.0, 2e-3])
def test_pair_objectives_equal_recomputed_objective(compute_ms):
  shape, num_experts = (2, 4), 16
  ids = random_ids(shape, 12, 4, num_experts, seed=7, skew=0.4)
  placement = np.random.default_rng(8).permutation(num_experts)
  cfg = config(compute_ms_per_pair=compute_ms)
  now, after = swap_objectives(ids, placement, shape, cfg)
  np.testing.assert_allclose(now, placement_time_ms(ids, placement, MeshShape(*shape), cfg,
                                                    smooth=True), rtol=1e-12)
  for i in range(num_experts):
    for j in range(num_experts):
      want = swap_objectives(ids, swapped(placement, i, j), shape, cfg)[0]
      np.testing.assert_allclose(after[i, j], want, rtol=1e-9, err_msg=f"pair {(i, j)}")


def test_crafted_skew_finds_known_best_pair():
  # 2x2 mesh, 2 slots per device: d0 = {0, 1}, d1 = {2, 3}, d2 = {4, 5}, d3 = {6, 7}.
  # Every token picks {0, 1, 7}: bringing expert 7 onto node 0 (device 1, slot 2 or
  # 3, both idle) removes all inter-node rows from node 0; the tie between slots 2
  # and 3 goes to the lower pair index.
  shape = (2, 2)
  ids = np.broadcast_to(np.array([0, 1, 7]), (4, 6, 3)).copy()
  cfg = config(migration=False)
  plan = search(ids, np.arange(8), shape, cfg)
  assert plan.pairs == ((2, 7),)
  np.testing.assert_array_equal(plan.placement, [0, 1, 7, 3, 4, 5, 6, 2])
  _, after = swap_objectives(ids, np.arange(8), shape, cfg)
  assert after[2, 7] == after[3, 7] < np.delete(after.ravel(), [2 * 8 + 7, 3 * 8 + 7,
                                                                7 * 8 + 2, 7 * 8 + 3]).min()
  np.testing.assert_allclose(plan.time_after_ms, predicted_time_ms(ids, plan.placement, shape,
                                                                   cfg), rtol=1e-12)
  assert plan.gain_ms > 0 and plan.migration_ms == 0.0 and plan.bytes_to_move == cfg.bytes_per_swap


def test_search_takes_the_argmin_over_all_pairs():
  shape, num_experts = (2, 4), 16
  ids = random_ids(shape, 24, 4, num_experts, seed=9, skew=0.5)
  placement = np.random.default_rng(10).permutation(num_experts)
  cfg = config(migration=False)
  plan = search(ids, placement, shape, cfg)
  device = np.arange(num_experts) // 2
  best = min((predicted_time_ms(ids, swapped(placement, i, j), shape, cfg), i, j)
             for i in range(num_experts) for j in range(i + 1, num_experts)
             if device[i] != device[j])
  assert plan.pairs == ((best[1], best[2]),)
  np.testing.assert_allclose(plan.time_after_ms, best[0], rtol=1e-9)


def test_multi_pair_is_disjoint_and_greedy():
  shape, num_experts = (2, 4), 16
  ids = random_ids(shape, 24, 4, num_experts, seed=11, skew=0.6)
  placement = np.random.default_rng(12).permutation(num_experts)
  single = search(ids, placement, shape, config(migration=False))
  plan = search(ids, placement, shape, config(migration=False, max_pairs=4))
  assert len(plan.pairs) >= 2 and plan.pairs[0] == single.pairs[0]
  slots = [s for pair in plan.pairs for s in pair]
  assert len(slots) == len(set(slots)), plan.pairs
  assert all(i // 2 != j // 2 for i, j in plan.pairs)
  # Replaying the accepted pairs gives the new placement and strictly falling times.
  current, times = np.array(placement), [plan.time_before_ms]
  for i, j in plan.pairs:
    current = swapped(current, i, j)
    times.append(predicted_time_ms(ids, current, shape, config()))
  np.testing.assert_array_equal(plan.placement, current)
  assert all(b < a for a, b in zip(times, times[1:]))
  np.testing.assert_allclose(plan.time_after_ms, times[-1], rtol=1e-9)
  assert plan.bytes_to_move == len(plan.pairs) * config().bytes_per_swap


def test_swap_that_does_not_pay_is_refused():
  shape, num_experts = (2, 4), 16
  ids = random_ids(shape, 24, 4, num_experts, seed=13, skew=0.5)
  placement = np.arange(num_experts)
  free = search(ids, placement, shape, config(migration=False))
  assert free.changed
  (i, j), = free.pairs
  cfg = config(d_ff=4096, steps_until_next_decision=1)
  move_ms = migration_ms(i, j, num_experts, shape, cfg)
  assert free.gain_ms < move_ms
  refused = search(ids, placement, shape, cfg)
  assert not refused.changed and refused.bytes_to_move == 0
  np.testing.assert_array_equal(refused.placement, placement)
  assert refused.time_after_ms == refused.time_before_ms
  # The same swap pays once its saving is earned over enough steps.
  steps = int(np.ceil(move_ms / free.gain_ms)) + 1
  accepted = search(ids, placement, shape,
                    dataclasses.replace(cfg, steps_until_next_decision=steps))
  assert accepted.pairs == free.pairs
  np.testing.assert_allclose(accepted.migration_ms, move_ms)
  inter = PROFILE.inter.time_ms(cfg.bytes_per_swap)
  intra = PROFILE.intra.time_ms(cfg.bytes_per_swap)
  assert move_ms == (inter if i // 8 != j // 8 else intra)
  assert cfg.bytes_per_swap == 2 * 3 * 3 * 32 * 4096 * 4


def test_deterministic():
  shape, num_experts = (2, 4), 16
  ids = random_ids(shape, 24, 4, num_experts, seed=15, skew=0.4)
  placement = np.random.default_rng(16).permutation(num_experts)
  cfg = config(migration=False, max_pairs=3, compute_ms_per_pair=1e-3)
  plans = [search(ids.copy(), placement.copy(), shape, cfg) for _ in range(3)]
  for plan in plans[1:]:
    assert plan.pairs == plans[0].pairs
    np.testing.assert_array_equal(plan.placement, plans[0].placement)
    assert plan.time_after_ms == plans[0].time_after_ms


def test_no_candidate_on_one_device_and_validation():
  ids = random_ids((1, 1), 8, 2, 4, seed=17)
  plan = search(ids, np.arange(4), (1, 1), config(migration=False))
  assert not plan.changed and plan.time_after_ms == plan.time_before_ms
  with pytest.raises(ValueError, match="permutation"):
    search(ids, np.array([0, 0, 1, 2]), (1, 1), config())
  with pytest.raises(ValueError, match=r"N\*G=2"):
    search(ids, np.arange(4), (1, 2), config())
  with pytest.raises(ValueError, match="max_pairs"):
    config(max_pairs=-1)


@pytest.mark.parametrize("mesh, tokens, seed, kept", [
    ((2, 4), 64, 11, 2), ((2, 4), 64, 13, 0), ((4, 2), 128, 13, 2)])
def test_exact_peaks_keep_the_prefix_that_pays(mesh, tokens, seed, kept):
  """With exact_peaks, a plan is the prefix of the smooth greedy's pairs with the
  largest net saving in the modelled time with exact peaks; it never reports a
  smooth-only gain, and is empty when no prefix lowers that time. `kept`: the
  prefix these routings give."""
  shape, num_experts = MeshShape(*mesh), 16
  ids = random_ids(mesh, tokens, 2, num_experts, seed=seed, skew=1.0 if tokens == 64 else 1.5)
  placement = np.random.default_rng(seed + 1).permutation(num_experts)
  smooth = search(ids, placement, shape, config(migration=False, max_pairs=6))
  exact_cfg = config(migration=False, max_pairs=6, exact_peaks=True)
  plan = search(ids, placement, shape, exact_cfg)
  assert plan.pairs == smooth.pairs[:len(plan.pairs)]
  times = [predicted_time_ms(ids, placement, shape, exact_cfg)]
  current = placement.copy()
  for i, j in smooth.pairs:
    current = swapped(current, i, j)
    times.append(predicted_time_ms(ids, current, shape, exact_cfg))
  assert plan.time_before_ms == times[0]
  best = int(np.argmin(times))  # free migration: the lowest exact time wins
  assert len(smooth.pairs) > kept and len(plan.pairs) == kept
  if times[best] < times[0]:
    assert len(plan.pairs) == best and plan.time_after_ms == times[best] < times[0]
  else:
    assert not plan.changed and plan.time_after_ms == times[0]
  # Every-token-picks-{0, 1, 7} on 2x2 (test_crafted_skew_finds_known_best_pair): moving
  # 7 next to 0 and 1 frees node 0's senders, but node 1's still send every token to
  # node 0, so the inter-node peak - what the exchange waits for - stays.
  crafted = np.broadcast_to(np.array([0, 1, 7]), (4, 6, 3)).copy()
  assert search(crafted, np.arange(8), (2, 2), config(migration=False)).changed
  held = search(crafted, np.arange(8), (2, 2), config(migration=False, exact_peaks=True))
  assert not held.changed


def co_selected_groups(tokens=32, seed=0):
  """4x2 mesh, 16 experts, top-4: each token picks one group {g, g+4, g+8, g+12},
  which the identity placement spreads over all 4 nodes (3 inter-node rows a token)."""
  group = np.random.default_rng(seed).integers(0, 4, size=(8, tokens))
  return np.stack([group + 4 * k for k in range(4)], axis=-1)


def test_placement_time_is_the_objective_without_pair_deltas():
  ids = random_ids((4, 2), 16, 3, 16, seed=21, skew=0.4)
  placement = np.random.default_rng(22).permutation(16)
  for compute_ms in (0.0, 1e-3):
    cfg = config(compute_ms_per_pair=compute_ms, window_steps=2)
    np.testing.assert_allclose(placement_time_ms(ids, placement, MeshShape(4, 2), cfg,
                                                 smooth=True),
                               swap_objectives(ids, placement, (4, 2), cfg)[0], rtol=1e-12)


def test_group_plan_colocates_co_selected_experts():
  """Co-locating each group on one node beats the best 2 pairs; the plan moves 12
  experts (one of each group stays), priced 12 slices, and its time is the model's."""
  shape, ids, ident = MeshShape(4, 2), co_selected_groups(), np.arange(16)
  cfg = config(max_pairs=2, slice_ms=1e-3, steps_until_next_decision=50)
  pairs = search(ids, ident, shape, cfg)
  plan = search(ids, ident, shape, dataclasses.replace(cfg, group_plans=True))
  assert pairs.kind == "pairs" and len(pairs.pairs) == 2
  assert plan.kind == "colocate" and plan.pairs == () and plan.slices == 12
  assert plan.net_ms(50) > pairs.net_ms(50) > 0
  node_of = np.argsort(plan.placement) // 4
  assert all(len(set(node_of[[g, g + 4, g + 8, g + 12]])) == 1 for g in range(4))
  assert sorted(np.flatnonzero(plan.placement == ident) // 4) == [0, 1, 2, 3]
  np.testing.assert_allclose(plan.time_after_ms, predicted_time_ms(ids, plan.placement, shape,
                                                                   cfg), rtol=1e-12)
  assert plan.migration_ms == pytest.approx(12e-3)
  assert plan.bytes_to_move == 6 * cfg.bytes_per_swap
  # A token now leaves its node once at most, only when its group lives elsewhere.
  away = node_of[ids[..., 0]] != (np.arange(8) // 2)[:, None]
  assert loop_loads(ids, plan.placement, (4, 2))[0].sum() == away.sum()
  # Too dear to move 12 slices over the horizon, the pairs (fewer slices) win.
  dear = dataclasses.replace(cfg, group_plans=True, slice_ms=plan.gain_ms * 50 / 12 * 1.01)
  assert search(ids, ident, shape, dear).kind == "pairs"


def test_pack_spreads_hot_experts():
  """Experts 0-3 carry most tokens and sit on devices 0 and 1: packing the loads
  over the devices cuts the compute peak; pairs (max 1) cannot match it."""
  rng = np.random.default_rng(23)
  hot = np.stack([rng.permutation(4)[:2] for _ in range(8 * 24)])
  cold = np.stack([4 + rng.permutation(12)[:2] for _ in range(8 * 24)])
  ids = np.concatenate([hot, cold], axis=1).reshape(8, 24, 4)
  shape, ident = MeshShape(4, 2), np.arange(16)
  cfg = config(max_pairs=1, migration=False, compute_ms_per_pair=1e-2, group_plans=True)
  plan = search(ids, ident, shape, cfg)
  assert plan.kind == "pack"
  device_of = np.argsort(plan.placement) // 2
  assert len(set(device_of[:4])) == 4  # the hot experts on four devices
  assert plan.gain_ms > search(ids, ident, shape, dataclasses.replace(
      cfg, group_plans=False)).gain_ms


def test_grow_pairs_continues_while_pairs_pay():
  shape, ids, ident = MeshShape(4, 2), co_selected_groups(), np.arange(16)
  cfg = config(max_pairs=1, slice_ms=1e-3, steps_until_next_decision=50)
  one = search(ids, ident, shape, cfg)
  grown = search(ids, ident, shape, dataclasses.replace(cfg, grow_pairs=True))
  assert len(one.pairs) == 1 and len(grown.pairs) > 1 and grown.pairs[0] == one.pairs[0]
  assert grown.gain_ms > one.gain_ms and grown.migration_ms == pytest.approx(
      2e-3 * len(grown.pairs))
  # Every accepted pair paid for itself: replay and check each step's saving.
  current, now = ident.copy(), grown.time_before_ms
  for i, j in grown.pairs:
    current = swapped(current, i, j)
    after = predicted_time_ms(ids, current, shape, cfg)
    assert (now - after) * 50 > 2e-3
    now = after
  # And it stops at the first pair that does not pay: the next best one loses money.
  _, pairs_after = swap_objectives(ids, grown.placement, shape, cfg)
  used = [s for pair in grown.pairs for s in pair]
  device = np.arange(16) // 2
  free = [(i, j) for i in range(16) for j in range(i + 1, 16)
          if device[i] != device[j] and i not in used and j not in used]
  best = min(pairs_after[i, j] for i, j in free) if free else now
  assert (now - best) * 50 <= 2e-3


@pytest.mark.parametrize("shape", [(1, 4), (4, 1), (2, 4), (8, 1)])
def test_group_plans_are_priced_permutations(shape):
  """On any mesh shape: a permutation, `slices` = experts that change device, priced
  per slice, the model's time; experts that stay on their device keep their slot."""
  from hiermoe_jax.swap import groups
  ids = random_ids(shape, 12, 3, 16, seed=31, skew=0.5)
  placement = np.random.default_rng(32).permutation(16)
  cfg = config(slice_ms=0.5)
  for plan in groups.group_plans(ids, placement, MeshShape(*shape), cfg):
    assert sorted(plan.placement) == list(range(16))
    per_device = 16 // (shape[0] * shape[1])
    old_device, new_device = (np.argsort(p) // per_device for p in (placement, plan.placement))
    moved = old_device != new_device
    assert plan.slices == moved.sum() and plan.migration_ms == pytest.approx(0.5 * moved.sum())
    stay = ~moved[plan.placement]  # slots whose expert did not change device
    np.testing.assert_array_equal(plan.placement[stay], placement[stay])
    np.testing.assert_allclose(plan.time_after_ms, predicted_time_ms(ids, plan.placement, shape,
                                                                     cfg), rtol=1e-12)
