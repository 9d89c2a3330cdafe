"""docs/design.md, invariant 4: a multi-process run equals the single-process run.

Two processes (one per node) with 4 CPU devices each and gloo collectives, started
by scripts/launch.py, run hier_dedup on a 2x4 mesh (tests/mp_worker_moe.py); this
process computes the same on its 8 simulated devices as a 2x4 mesh. Once over
loopback, once with each process in its own network namespace behind a 1gbit link.
Only hier_dedup: it exercises both tiers, and each strategy costs ~10 s of
compilation per run on a 2-core machine.

Issue #6 and #17: expert-swap decisions taken in two processes from token-sharded
routing replayed from a trace file are the same on both, and the same as one process
deciding from all of it.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import hiermoe_jax as hm
from hiermoe_jax import traces
from hiermoe_jax.cluster import netns
from hiermoe_jax.swap import SwapController

import mp_worker_moe

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["hier_dedup"]
NETNS_MISSING = netns.unavailable_reason()


@pytest.fixture(scope="module")
def single_process():
  return mp_worker_moe.run(hm.make_mesh(nodes=2, local=4), STRATEGIES)


def launch_worker(*worker_args, options=()):
  """Runs tests/mp_worker_moe.py WORKER_ARGS as 2 processes x 4 devices; checks the mesh."""
  command = [sys.executable, str(ROOT / "scripts" / "launch.py"), "--processes", "2",
             "--local-devices", "4", "--timeout", "150", *options, "--",
             sys.executable, str(ROOT / "tests" / "mp_worker_moe.py"), *worker_args]
  # The children must not see this process's 8 devices: the launcher sets 4.
  result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
  for rank in range(2):
    assert (f"[{rank}] process {rank}/2: mesh {{'node': 2, 'local': 4}}, 4 local devices"
            in result.stdout), result.stdout


def load(path):
  with np.load(path) as out:
    return {name: out[name] for name in out.files}


def run_two_processes(out_path, *options):
  launch_worker(str(out_path), *STRATEGIES, options=options)
  return load(out_path)


def check_equal(multi, single):
  assert sorted(multi) == sorted(single)
  for name in single:
    np.testing.assert_allclose(multi[name], single[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_two_processes_match_one(tmp_path, single_process):
  check_equal(run_two_processes(tmp_path / "out.npz"), single_process)


@pytest.mark.skipif(NETNS_MISSING is not None, reason=f"--inter-node-rate: {NETNS_MISSING}")
def test_two_namespaced_nodes_behind_a_shaped_link_match_one(tmp_path, single_process):
  check_equal(run_two_processes(tmp_path / "out.npz", "--inter-node-rate", "1gbit"),
              single_process)


def write_trace(path, config, steps=4, tokens=300):
  """A skewed routing trace in the trainer's format: fewer steps than the run (replay
  wraps around) and more tokens than the mesh holds (replay takes the first)."""
  from hiermoe_jax.bench import synthetic
  layers = {layer: synthetic.routing("zipf:1.5", devices=steps, tokens=tokens,
                                     num_experts=config.num_experts, top_k=config.top_k,
                                     seed=1000 + layer)
            for layer in range(mp_worker_moe.SWAP_LAYERS)}
  traces.save(path, layers, num_experts=config.num_experts)


def test_two_processes_take_the_same_swap_decisions_from_a_trace(tmp_path):
  config = hm.MoEConfig(**mp_worker_moe.CONFIG)
  trace = tmp_path / "routing.npz"
  write_trace(trace, config)
  launch_worker("--swap", str(tmp_path / "swap"), str(trace))
  per_process = [load(tmp_path / f"swap.{rank}.npz") for rank in range(2)]
  check_equal(per_process[1], per_process[0])

  # One process deciding from all the ids, with the controller's own searches.
  mesh = hm.make_mesh(nodes=2, local=4)
  controller = SwapController(mp_worker_moe.swap_search_config(config), mesh,
                              mp_worker_moe.SWAP_INTERVAL)
  placements = {i: np.arange(config.num_experts) for i in range(mp_worker_moe.SWAP_LAYERS)}
  decision = 0
  for step in range(mp_worker_moe.SWAP_STEPS):
    for layer in placements:
      controller.observe(layer, mp_worker_moe.swap_routing(step, layer, mesh.size, config,
                                                           trace))
    if not controller.due(step + 1):
      continue
    for layer, placement in placements.items():
      plan = controller.plan(layer, placement)
      if plan.changed:
        placements[layer] = plan.placement
      np.testing.assert_array_equal(per_process[0][f"placements_{layer}"][decision],
                                    placements[layer], err_msg=f"{layer=} {decision=}")
    decision += 1
  for layer, placement in placements.items():
    assert not np.array_equal(placement, np.arange(config.num_experts))  # swaps happened
    # Weights followed: slot s holds the initial stack's expert placement[s].
    initial = hm.init_params(jax.random.key(layer), config, mesh)["experts"]["gate"]
    np.testing.assert_array_equal(per_process[0][f"gate_{layer}"], np.asarray(initial)[placement])
