"""DeepSeek EPLB placement (hiermoe_jax/swap/eplb.py) and the placement comparison
(hiermoe_jax/bench/placements.py, scripts/compare_placements.py)."""

import itertools
import json

import numpy as np
import pytest

from hiermoe_jax import cost, traces, traffic
from hiermoe_jax.bench import placements
from hiermoe_jax.bench.swap import drifting_routing
from hiermoe_jax.config import ConfigError
from hiermoe_jax.mesh import MeshShape
from hiermoe_jax.swap import eplb
from hiermoe_jax.swap.search import SearchConfig, predicted_time_ms

E, K = 32, 4


def per_device(load_E, placement, devices):
  return load_E[placement].reshape(devices, -1).sum(1)


def skewed_load(seed=0):
  ids = drifting_routing(devices=8, tokens=64, num_experts=E, top_k=K, alpha=1.2, steps=1,
                         seed=seed)[0]
  return eplb.expert_load(ids, E)


def test_balanced_packing_by_hand_and_equal_pack_sizes():
  # 5 -> pack 0, 4 -> pack 1, 2 -> pack 1 (4 < 5), 1 -> pack 0: loads 6 and 6.
  np.testing.assert_array_equal(eplb.balanced_packing([5, 1, 4, 2], 2), [0, 0, 1, 1])
  pack_of = eplb.balanced_packing(np.random.default_rng(1).random(24), 4)
  assert np.bincount(pack_of).tolist() == [6] * 4
  with pytest.raises(ValueError, match="equal packs"):
    eplb.balanced_packing([1, 2, 3], 2)


@pytest.mark.parametrize("mesh", [(4, 2), (2, 4), (1, 8)])
def test_eplb_is_a_permutation_that_balances_skewed_load(mesh):
  shape = MeshShape(*mesh)
  for seed in range(3):
    load_E = skewed_load(seed)
    placement = eplb.eplb_placement(load_E, shape)
    assert placement.dtype == np.int32
    np.testing.assert_array_equal(np.sort(placement), np.arange(E))
    identity = per_device(load_E, np.arange(E), shape.devices)
    balanced = per_device(load_E, placement, shape.devices)
    assert balanced.sum() == identity.sum()
    assert balanced.max() < identity.max(), (seed, balanced, identity)
    # Greedy packing's bound: the heaviest device exceeds the mean by < the heaviest expert
    # per node, twice (once across nodes, once inside one).
    assert balanced.max() <= balanced.mean() + 2 * load_E.max()


def test_eplb_keeps_each_group_on_one_node():
  shape, groups = MeshShape(2, 4), 8  # 4 experts per group, 4 groups per node
  load_E = skewed_load()
  placement = eplb.eplb_placement(load_E, shape, groups)
  node_of_expert = np.empty(E, int)
  node_of_expert[placement] = np.arange(E) // (E // shape.nodes)
  for group in range(groups):
    members = node_of_expert[group * 4:(group + 1) * 4]
    assert len(set(members.tolist())) == 1, (group, members)
  # Group loads are balanced over the nodes no worse than any other 4+4 split allows
  # by more than the heaviest group.
  group_load = load_E.reshape(groups, -1).sum(1)
  node_load = np.bincount(node_of_expert[::4], weights=group_load, minlength=2)
  best = min(abs(2 * group_load[list(c)].sum() - group_load.sum())
             for c in itertools.combinations(range(groups), 4))
  assert abs(node_load[0] - node_load[1]) <= best + group_load.max()


@pytest.mark.parametrize("mesh", [(4, 2), (2, 4), (1, 8), (8, 1)])
def test_dedup_peaks_equal_traffic_stats(mesh):
  shape = MeshShape(*mesh)
  ids = drifting_routing(devices=8, tokens=24, num_experts=E, top_k=K, alpha=1.0, steps=1,
                         seed=4)[0]
  for placement in (np.arange(E), np.random.default_rng(5).permutation(E)):
    stats = traffic.stats(ids, mesh_shape=mesh, num_experts=E, placement=placement,
                          d_model=8, strategies=placements.STRATEGIES)
    peaks = placements.dedup_peaks(ids, placement, shape)
    for name in placements.STRATEGIES:
      assert peaks[name] == cost.peak_rows_per_hop(name, stats[name]), (name, mesh)


def test_eplb_rejects_groups_that_do_not_fit():
  with pytest.raises(ConfigError, match="num_groups=3 is invalid"):
    eplb.eplb_placement(np.ones(E), (2, 4), 3)
  with pytest.raises(ConfigError, match="num_groups=2 is invalid"):
    eplb.eplb_placement(np.ones(E), (4, 2), 2)  # fewer groups than nodes


def test_compare_placements_on_a_tiny_trace(tmp_path, capsys):
  steps = drifting_routing(devices=8, tokens=32, num_experts=E, top_k=K, alpha=1.2, steps=6,
                           seed=2)
  path = tmp_path / "t.npz"
  traces.save(path, {3: np.stack([s.reshape(-1, K) for s in steps])}, num_experts=E)
  out = tmp_path / "cmp.json"
  assert placements.main(["--routing", f"trace:{path}:3", "--observe", "4", "--held-out", "2",
                          "--swap-interval", "4", "--max-pairs", "2", "--hidden", "16",
                          "--json", str(out)]) == 0
  table = capsys.readouterr().out
  report = json.loads(out.read_text())
  assert set(report["meshes"]) == {"4x2", "2x4"}
  for mesh, entry in report["meshes"].items():
    shape = MeshShape(*map(int, mesh.split("x")))
    assert any(line.split()[:2] == [mesh, "eplb"] for line in table.splitlines())
    for name in placements.PLACEMENTS:
      placement = np.array(entry[name]["placement"])
      np.testing.assert_array_equal(np.sort(placement), np.arange(E))
      assert entry[name]["held_out"]["hier_dedup_ms"] > 0
    # EPLB balances the compute of the steps it saw; the swap search lowers its own
    # objective on them (one decision on the whole observed window).
    assert (entry["eplb"]["observed"]["max_over_mean_pairs"]
            < entry["identity"]["observed"]["max_over_mean_pairs"])
    config = SearchConfig(profile=cost.load_profile("cpu_netns_1gbit"), d_model=16, d_ff=128)
    ids = np.concatenate([s.reshape(shape.devices, -1, K) for s in steps[:4]], axis=1)
    assert entry["swap"]["pairs"] > 0
    assert (predicted_time_ms(ids, np.array(entry["swap"]["placement"]), shape, config)
            < predicted_time_ms(ids, np.arange(E), shape, config))
    # The scores equal the cost model on the replayed steps, recomputed here.
    expected = placements.score(
        [s.reshape(shape.devices, -1, K) for s in steps[4:6]], np.arange(E), shape, E,
        cost.load_profile("cpu_netns_1gbit"), 16)
    assert entry["identity"]["held_out"] == expected
