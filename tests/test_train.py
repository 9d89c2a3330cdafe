"""End-to-end training: the loss falls, kill + resume follows the uninterrupted
trajectory exactly, a checkpoint restores onto another mesh shape, and bad
configs are rejected naming the key.

One reference run (tiny, 20 steps, 2x4 mesh, dropless so that the model's
function does not depend on the mesh shape) is shared by the tests, and by the
pytest-xdist workers (computed once, under a file lock). A persistent compilation
cache lets the resumed runs and the CLI subprocesses reuse compiled executables.
"""

import contextlib
import fcntl
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from models import cli
from models.checkpoint import Checkpointer
from models.config import load_config
from models.metrics import read_metrics
from models.train_loop import expert_sites, run
from models.transformer import layer_state
from helpers import shared_dir, xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STEPS, EVERY = 20, 5
BASE = [f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.eval_every=10",
        "train.keep=10", "moe.dropless=true"]
MESH_2X4 = ["mesh.nodes=2", "mesh.local=4"]
MESH_1X8 = ["mesh.nodes=1", "mesh.local=8"]


@contextlib.contextmanager
def file_lock(path):
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    yield


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cache_dir):
  """The uninterrupted run's directory (checkpoints every 5 steps, metrics.jsonl)."""
  root = shared_dir(tmp_path_factory)
  run_dir = root / "hiermoe_train_reference"
  with file_lock(root / "hiermoe_train_reference.lock"):
    if not (run_dir / "DONE").exists():
      shutil.rmtree(run_dir, ignore_errors=True)
      run(load_config(TINY, BASE + MESH_2X4), run_dir, verbose=False)
      (run_dir / "DONE").touch()
  return run_dir


def saved_state(run_dir, step):
  """The TrainState checkpointed at `step`, restored on the reference's 2x4 mesh."""
  from models.steps import Model
  from models.train_loop import run_mesh
  cfg = load_config(TINY, BASE + MESH_2X4)
  model = Model(cfg, run_mesh(cfg))
  checkpointer = Checkpointer(run_dir, keep=10)
  try:
    state, meta, _ = checkpointer.restore(step, model.abstract_state())
  finally:
    checkpointer.close()
  assert meta["data_position"] == step
  return state


def losses(records):
  return {r["step"]: r["loss"] for r in records}


def leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def test_loss_decreases_over_20_steps(reference):
  run_dir = reference
  records = read_metrics(run_dir)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  first, last = records[0]["loss"], np.mean([r["loss"] for r in records[-3:]])
  assert first > 5.0  # about log(256) for a fresh byte-level model
  assert last < first - 1.5, (first, last)
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  assert len(evals) == 2 and evals[1] < evals[0]
  for r in records:
    assert r["strategy"] == ["hier_dedup", "hier_dedup"]
    assert r["dropped"] == [0, 0]  # dropless
    assert all(x >= 1.0 for x in r["imbalance"])
    assert r["swaps"] == [] and r["tokens_per_s"] > 0 and r["grad_norm"] > 0
  # Linear warmup over tiny's 20 warmup steps: the first update already moves.
  lrs = [r["lr"] for r in records]
  assert lrs[0] == pytest.approx(3e-3 / 20) and lrs == sorted(lrs)
  assert lrs[-1] == pytest.approx(3e-3)


def test_kill_then_resume_follows_the_same_trajectory(reference, tmp_path, cache_dir):
  """SIGKILL the CLI mid-run, resume in-process: same losses and final state, bit for bit."""
  ref_dir = reference
  run_dir = tmp_path / "killed"
  env = {**os.environ, "XLA_FLAGS": xla_flags(),
         "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(TINY),
         "--mesh", "2x4", "--run-dir", str(run_dir), "--steps", str(STEPS),
         "--checkpoint-every", str(EVERY), "--keep", "10", "--dropless",
         "--set", "train.eval_every=10"]
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  metrics = run_dir / "metrics.jsonl"
  deadline = time.monotonic() + 300
  while proc.poll() is None and time.monotonic() < deadline:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 2 * EVERY + 2:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  proc.wait(timeout=60)
  stderr = proc.stderr.read().decode()
  assert proc.returncode == -signal.SIGKILL, stderr  # it was killed mid-run
  killed_at = len(metrics.read_text().splitlines())
  assert 2 * EVERY + 2 <= killed_at < STEPS

  resumed = run(load_config(TINY, BASE + MESH_2X4), run_dir, verbose=False)
  assert EVERY <= resumed.start_step <= killed_at
  assert resumed.start_step % EVERY == 0
  ref_losses = losses(read_metrics(ref_dir))
  got = losses(read_metrics(run_dir))
  assert sorted(got) == list(range(1, STEPS + 1))  # one record per step, none twice
  assert got == ref_losses  # exactly: same data order, same state, same programs
  final = saved_state(ref_dir, STEPS)
  assert len(leaves(final)) == len(leaves(resumed.state))
  for a, b in zip(leaves(resumed.state), leaves(final)):
    np.testing.assert_array_equal(a, b)


def test_checkpoint_from_2x4_resumes_on_1x8(reference, tmp_path):
  ref_dir = reference
  run_dir = tmp_path / "remeshed"
  shutil.copytree(ref_dir, run_dir)
  (run_dir / "DONE").unlink()
  for step_dir in (run_dir / "checkpoints").iterdir():
    if step_dir.name.isdigit() and int(step_dir.name) > 10:
      shutil.rmtree(step_dir)
  resumed = run(load_config(TINY, BASE + MESH_1X8), run_dir, verbose=False)
  assert resumed.start_step == 10
  ref_losses = losses(read_metrics(ref_dir))
  got = losses(resumed.records)
  assert sorted(got) == list(range(11, STEPS + 1))
  # Dropless routing makes the model the same function on any mesh; only the
  # order of float32 reductions differs between 2x4 and 1x8.
  np.testing.assert_allclose([got[s] for s in sorted(got)],
                             [ref_losses[s] for s in sorted(got)], rtol=1e-4)
  assert resumed.state.params["embed"]["embedding"][...].sharding.mesh.shape["local"] == 8


def test_two_processes_match_one_process(reference, tmp_path):
  """docs/design.md, invariant 4, for training: scripts/launch.py runs the CLI as two
  processes (one per node, 4 devices each, gloo); the first steps equal the
  single-process 2x4 reference up to float32 reduction order."""
  run_dir = tmp_path / "two_process"
  steps = 4
  cmd = [sys.executable, str(ROOT / "scripts" / "launch.py"), "--processes", "2",
         "--local-devices", "4", "--timeout", "240", "--",
         sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(TINY),
         "--run-dir", str(run_dir), "--steps", str(STEPS), "--stop-after", str(steps),
         "--checkpoint-every", str(EVERY), "--dropless", "--set", "train.eval_every=10"]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=270, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
  got = losses(read_metrics(run_dir))  # written by process 0 only
  assert sorted(got) == list(range(1, steps + 1))
  ref = losses(read_metrics(reference))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(got)],
                             rtol=1e-5)


def test_deepseek_style_layers_update_and_checkpoint_router_biases(tmp_path, cache_dir):
  """A dense first layer, then sigmoid group-limited routing with the aux-loss-free bias:
  one step moves every bias by exactly +-rate (or 0), and the checkpoint holds it."""
  rate = 0.01
  cfg = load_config(TINY, MESH_2X4 + [
      "train.steps=1", "train.eval_every=0", "model.first_k_dense=1",
      "moe.router=sigmoid_grouped", "moe.n_group=4", "moe.topk_group=2",
      "moe.n_shared_experts=1", f"moe.bias_update_rate={rate}", "moe.load_balance_weight=0"])
  result = run(cfg, tmp_path, verbose=False)
  (record,) = result.records
  assert record["strategy"] == ["hier_dedup"] and len(record["imbalance"]) == 1
  moe_layer = lambda state: layer_state(state.buffers, cfg.model, 1)["ffn"]  # either layout
  bias = np.asarray(moe_layer(result.state)["router_bias"][...])
  assert set(np.round(bias / rate).astype(int).tolist()) <= {-1, 0, 1}
  assert np.any(bias > 0) and np.any(bias < 0)
  param_paths = [jax.tree_util.keystr(path) for path, _ in
                 jax.tree_util.tree_flatten_with_path(result.state.params)[0]]
  assert not any("router_bias" in p or "placement" in p for p in param_paths)  # not trained
  from models.steps import Model
  from models.train_loop import run_mesh
  checkpointer = Checkpointer(tmp_path, keep=1)
  try:
    saved = checkpointer.restore(1, Model(cfg, run_mesh(cfg)).abstract_state()).state
  finally:
    checkpointer.close()
  np.testing.assert_array_equal(moe_layer(saved)["router_bias"][...], bias)
  np.testing.assert_array_equal(moe_layer(saved)["placement"][...],
                                np.arange(cfg.moe.num_experts))


def test_expert_swaps_follow_the_same_trajectory(reference, tmp_path):
  """docs/design.md, invariant 3, in the trainer: --swap-interval 2 (migration priced at 0, so
  every predicted gain is taken) gives the losses of the run without swaps; the events
  are in metrics.jsonl and the checkpoint holds the new placements, with the experts
  (and their optimizer state) in the matching physical order."""
  steps = 6
  cfg = load_config(TINY, BASE + MESH_2X4 + [
      "train.swap_interval=2", "train.swap_migration_cost=false", "train.swap_max_pairs=2"])
  result = run(cfg, tmp_path, stop_after=steps, verbose=False)
  ref = losses(read_metrics(reference))
  got = losses(read_metrics(tmp_path))
  assert sorted(got) == list(range(1, steps + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(got)],
                             rtol=1e-5)
  records = read_metrics(tmp_path)
  events = [e for r in records for e in r["swaps"]]
  assert events, "no swap happened"
  for r in records:
    assert r["step"] % 2 == 0 or r["swaps"] == []
    for e in r["swaps"]:
      assert set(e) == {"layer", "kind", "slices", "pairs", "predicted_gain_ms",
                        "predicted_migration_ms", "priced_by", "migration_ms", "bytes_moved",
                        "time_s"}
      assert e["layer"] in (0, 1) and 1 <= len(e["pairs"]) <= 2 and e["bytes_moved"] > 0
      assert e["predicted_gain_ms"] > 0
  # Checkpoint 5 (after the swaps of steps 2 and 4) vs the reference's checkpoint 5.
  swapped, plain = saved_state(tmp_path, EVERY), saved_state(reference, EVERY)
  replayed = {layer: np.arange(cfg.moe.num_experts) for layer in (0, 1)}
  for r in records[:EVERY]:
    for e in r["swaps"]:
      for i, j in e["pairs"]:
        p = replayed[e["layer"]]
        p[[i, j]] = p[[j, i]]
  final_events = [e for r in records if r["step"] <= steps for e in r["swaps"]]
  logical = {}  # layer -> slot of each logical expert
  for layer in (0, 1):
    placement = np.asarray(layer_state(swapped.buffers, cfg.model, layer)["ffn"]["placement"][...])
    np.testing.assert_array_equal(placement, replayed[layer])
    logical[layer] = np.argsort(placement)
    final = layer_state(result.state.buffers, cfg.model, layer)["ffn"]["placement"][...]
    assert np.array_equal(final, np.arange(16)) == all(e["layer"] != layer
                                                       for e in final_events)
  # Expert leaves in logical order: a layer's [E, ...] leaf, or its row of a scanned run's.
  tree = (swapped.params, swapped.opt_state)
  names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  got = [np.array(x) for x in jax.tree.leaves(tree)]
  sites = expert_sites(cfg.model, [0, 1], tree)
  for n, layer, row in sites:
    assert "['ffn']['params']['experts']" in names[n]
    if row is None:
      got[n] = got[n][logical[layer]]
    else:
      got[n][row] = got[n][row][logical[layer]]
  assert len(sites) == 2 * 3 * 3  # 2 layers x (gate, up, down) x (param, mu, nu)
  for name, a, b in zip(names, got, jax.tree.leaves((plain.params, plain.opt_state))):
    np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=name)


def test_resumed_swaps_decide_as_uninterrupted_ones(tmp_path):
  """The swap controller's routing window is checkpointed: with a window of 4 steps and a
  decision every 2, a run stopped after step 5 and resumed takes, at steps 6 and 8, the
  decisions of a run that never stopped (without the saved window, step 6 would see only
  its own routing)."""
  cfg = load_config(TINY, BASE + MESH_2X4 + [
      "train.swap_interval=2", "train.swap_window=4", "train.swap_migration_cost=false",
      "train.swap_max_pairs=2"])
  def swaps(run_dir):
    return {r["step"]: [(e["layer"], e["pairs"]) for e in r["swaps"]]
            for r in read_metrics(run_dir)}
  whole = run(cfg, tmp_path / "whole", stop_after=8, verbose=False)
  run(cfg, tmp_path / "split", stop_after=EVERY, verbose=False)
  checkpointer = Checkpointer(tmp_path / "split", keep=10)
  try:  # the decision schedule travels in the step's JSON record
    assert checkpointer.read_meta(EVERY)["swap_schedule"]["next_decision"] == 6
  finally:
    checkpointer.close()
  resumed = run(cfg, tmp_path / "split", stop_after=8 - EVERY, verbose=False)
  assert resumed.start_step == EVERY
  expected, got = swaps(tmp_path / "whole"), swaps(tmp_path / "split")
  assert expected[6] or expected[8], "no swap after the resume point: nothing compared"
  assert got == expected
  for a, b in zip(leaves(resumed.state), leaves(whole.state)):
    np.testing.assert_array_equal(a, b)


def test_plot_metrics(reference, tmp_path):
  """PNGs when matplotlib is there; otherwise a one-line message and exit code 3."""
  cmd = [sys.executable, str(ROOT / "scripts" / "plot_metrics.py"), str(reference),
         "--out", str(tmp_path)]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    assert result.returncode == 3 and "needs matplotlib" in result.stderr, result.stderr
    return
  assert result.returncode == 0, result.stderr
  for name in ("loss", "throughput", "imbalance"):
    assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, names", [
    (["--set", "train.bogus=1"], "train.bogus"),
    (["--set", "moe.d_model=32"], "moe.d_model"),
    (["--set", "moe.expert_axes=node"], "moe.expert_axes"),  # the trainer's mesh axes
    (["--set", "model.n_heads=3"], "model.n_heads"),
    (["--set", "train.lr=fast"], "train.lr"),
    (["--dispatch", "teleport"], "moe.dispatch"),
    (["--capacity-factor", "-1"], "moe.capacity_factor"),
    (["--swap-interval", "-1"], "train.swap_interval"),
    (["--swap-interval", "2", "--set", "train.swap_profile=nowhere"], "train.swap_profile"),
    (["--mesh", "3x3"], "mesh.nodes=3"),
    (["--set", "moe.num_experts=12"], "moe.num_experts"),  # not a multiple of 8 devices
])
def test_cli_rejects_bad_config_naming_the_key(argv, names, capsys, tmp_path):
  code = cli.main(["--config", str(TINY), "--run-dir", str(tmp_path)] + argv)
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert names in err
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert not (tmp_path / "metrics.jsonl").exists()
