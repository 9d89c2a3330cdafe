"""DESIGN.md section 8, invariant 4: a multi-process run equals the single-process run.

Two processes (one per node) with 4 CPU devices each and gloo collectives, started
by scripts/launch.py, run hier_dedup on a 2x4 mesh (tests/mp_worker_moe.py); this
process computes the same on its 8 simulated devices as a 2x4 mesh. Once over
loopback, once with each process in its own network namespace behind a 1gbit link.
Only hier_dedup: it exercises both tiers, and each strategy costs ~10 s of
compilation per run on a 2-core machine.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hiermoe_jax as hm
from hiermoe_jax import netns

import mp_worker_moe

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["hier_dedup"]
NETNS_MISSING = netns.unavailable_reason()


@pytest.fixture(scope="module")
def single_process():
  return mp_worker_moe.run(hm.make_mesh(nodes=2, local=4), STRATEGIES)


def run_two_processes(out_path, *options):
  command = [sys.executable, str(ROOT / "scripts" / "launch.py"), "--processes", "2",
             "--local-devices", "4", "--timeout", "150", *options, "--",
             sys.executable, str(ROOT / "tests" / "mp_worker_moe.py"), str(out_path), *STRATEGIES]
  # The children must not see this process's 8 devices: the launcher sets 4.
  result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
  for rank in range(2):
    assert (f"[{rank}] process {rank}/2: mesh {{'node': 2, 'local': 4}}, 4 local devices"
            in result.stdout), result.stdout
  with np.load(out_path) as out:
    return {name: out[name] for name in out.files}


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
