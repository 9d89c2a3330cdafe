"""Host-side traffic statistics vs brute-force counting and vs run-time aux."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import hiermoe_jax as hm
from hiermoe_jax import traffic
from hiermoe_jax.bench import synthetic
from hiermoe_jax.config import STRATEGIES
from hiermoe_jax.dispatch import get_strategy
from hiermoe_jax.dispatch.capacity import capacities
from hiermoe_jax.mesh import MeshShape
from bruteforce import simulate
from helpers import mesh_of, random_inputs, router_config

BENCH = str(pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_comm.py")


def _bruteforce_stats(slots, shape, num_experts, strategy, caps=None):
  sim = simulate(slots.tolist(), strategy=strategy, nodes=shape.nodes, local=shape.local,
                 num_experts=num_experts, hop_caps=None if caps is None else caps.hops,
                 expert_cap=None if caps is None else caps.expert,
                 pair_cap=None if caps is None else caps.pairs)
  rows = {"inter": 0, "intra": 0}
  peak = {"inter": 0, "intra": 0}
  for tier, sent in zip(get_strategy(strategy).tiers, sim["sent"]):
    for d, row in enumerate(sent):
      for p, n in enumerate(row):
        dest = {"flat": p, "inter": p * shape.local + d % shape.local,
                "intra": d // shape.local * shape.local + p}[tier]
        if dest == d:
          continue
        kind = "inter" if dest // shape.local != d // shape.local else "intra"
        rows[kind] += n
        peak[kind] = max(peak[kind], n)
  return rows, peak, sim


@pytest.mark.parametrize("mesh_shape", [(2, 4), (4, 2), (1, 8), (3, 2)])
@pytest.mark.parametrize("capacity_factor", [None, 0.6])
def test_stats_equal_bruteforce(mesh_shape, capacity_factor):
  shape = MeshShape(*mesh_shape)
  rng = np.random.default_rng(sum(mesh_shape))
  experts, tokens, top_k = 4 * shape.devices, 12, 3
  ids = np.stack([np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
                  for _ in range(shape.devices)])
  placement = rng.permutation(experts)
  out = traffic.stats(ids, mesh_shape=mesh_shape, num_experts=experts, placement=placement,
                      d_model=8, bytes_per_elem=2, capacity_factor=capacity_factor)
  slots = np.argsort(placement)[ids]
  for name in STRATEGIES:
    caps = None if capacity_factor is None else capacities(
        get_strategy(name), tokens=tokens, top_k=top_k, num_experts=experts, shape=shape,
        capacity_factor=capacity_factor, dropless=False)
    rows, peak, sim = _bruteforce_stats(slots, shape, experts, name, caps)
    assert out[name]["rows"] == rows, name
    assert out[name]["max_rows_per_peer"] == peak, name
    assert out[name]["bytes"] == {k: v * 8 * 2 for k, v in rows.items()}
    assert out[name]["dropped_by_stage"] == sim["dropped"], name
  # Dedup rates: distinct (token, node) / (token, device) pairs counted directly.
  for level, group in (("node", experts // shape.nodes), ("device", experts // shape.devices)):
    distinct = sum(len({s // group for s in tok}) for dev in slots for tok in dev)
    assert out["flat"]["dedup_rate"][level] == pytest.approx(1 - distinct / ids.size)


def test_hier_dedup_inter_rows_at_floor():
  ids = synthetic.routing("uniform", devices=8, tokens=64, num_experts=32, top_k=4, seed=1)
  out = traffic.stats(ids, mesh_shape=(2, 4), num_experts=32, d_model=4)
  floor = traffic.inter_node_floor(ids, MeshShape(2, 4), 32)
  assert out["hier_dedup"]["rows"]["inter"] == floor
  assert out["flat"]["rows"]["inter"] > floor


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_runtime_aux_equals_host_stats(strategy):
  mesh = mesh_of("2x4")
  config = router_config("softmax", dispatch=strategy, dropless=False, capacity_factor=0.75)
  params, x, placement, _ = random_inputs(config, mesh, tokens_per_device=16, seed=5)
  _, aux = jax.jit(lambda p, x: hm.moe_apply(p, x, config=config, mesh=mesh,
                                             placement=placement))(params, x)
  routing = hm.reference.reference_routing(params, x, config)
  ids = np.asarray(routing.ids_TK).reshape(8, 16, config.top_k)
  host = traffic.stats(ids, mesh_shape=(2, 4), num_experts=16, placement=np.asarray(placement),
                       d_model=16, strategies=[strategy], capacity_factor=0.75)[strategy]
  assert {k: int(v) for k, v in aux.rows.items()} == host["rows"]
  assert {k: int(v) for k, v in aux.max_rows_per_peer.items()} == host["max_rows_per_peer"]
  assert {k: int(v) for k, v in aux.dropped_by_stage.items()} == host["dropped_by_stage"]
  for level in ("node", "device"):
    assert float(aux.dedup_rate[level]) == pytest.approx(host["dedup_rate"][level], abs=1e-6)


def test_bench_comm_analytic_cli(tmp_path):
  out = tmp_path / "a.json"
  cmd = [sys.executable, BENCH, "--analytic", "--mesh", "4x8", "--experts",
         "64", "--topk", "2", "--tokens", "64", "--hidden", "16", "--routing", "zipf:1.0",
         "--json", str(out)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
  assert "hier_dedup" in proc.stdout
  report = json.loads(out.read_text())
  assert [r["strategy"] for r in report["results"]] == list(STRATEGIES)
  for r in report["results"]:
    assert set(r) >= {"strategy", "rows", "bytes", "max_rows_per_peer", "dedup_rate", "dropped"}
  bad = subprocess.run(cmd[:2] + ["--analytic", "--mesh", "4x8", "--experts", "60"],
                       capture_output=True, text=True)
  assert bad.returncode == 2
  assert "--experts=60 is invalid: must be a multiple of the 32 devices" in bad.stderr
  bad = subprocess.run(cmd[:2] + ["--analytic", "--routing", "zipf:x"], capture_output=True,
                       text=True)
  assert bad.returncode == 2 and "zipf needs an exponent" in bad.stderr
