"""The host-side `auto` (hiermoe_jax/calibrate.py, models/steps.AutoDispatch): the timed
program is the MoE layer itself, decisions take the argmin, hysteresis keeps them from
flapping, the trainer compiles once per distinct choice, and every process decides alike."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hiermoe_jax as hm
from hiermoe_jax import calibrate
from hiermoe_jax.calibrate import AutoTuner
from hiermoe_jax.errors import ConfigError
from hiermoe_jax.experts import swiglu
from helpers import mesh_of
from models.config import load_config
from models.train_loop import run

ROOT = pathlib.Path(__file__).resolve().parents[1]
CANDIDATES = ("flat_dedup", "hier_dedup")
CONFIG = hm.MoEConfig(d_model=16, d_ff=32, num_experts=16, top_k=4, dropless=True)


def times(flat: float, hier: float) -> dict[str, float]:
  return {"flat_dedup": flat, "hier_dedup": hier}


# ----------------------------------------------------------------------- timed program

def test_the_timed_program_is_the_moe_layer_and_matches_the_dense_reference():
  """layer_step runs dispatch -> experts -> combine as moe_apply does: with dropless
  buffers each token gets sum_k w_k * expert_k(x), computed here directly in float32."""
  mesh = mesh_of("2x4")
  tokens = 8 * 16
  ids = calibrate.uniform_ids(CONFIG, tokens, seed=3)
  x = np.random.default_rng(0).standard_normal((tokens, CONFIG.d_model)).astype(np.float32)
  w = np.random.default_rng(1).random((tokens, CONFIG.top_k)).astype(np.float32)
  experts = hm.init_params(jax.random.key(0), CONFIG, mesh)["experts"]
  y_TED = jax.vmap(lambda g, u, d: swiglu(jnp.asarray(x), g, u, d), out_axes=1)(
      experts["gate"], experts["up"], experts["down"])
  expected = np.einsum("tk,tkd->td", w, np.take_along_axis(np.asarray(y_TED), ids[..., None], 1))
  assert calibrate.candidates(CONFIG, mesh) == CANDIDATES
  for name in CANDIDATES:
    y = calibrate.layer_step(mesh, CONFIG, name, False)(x, ids, w, experts, x)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=2e-5, atol=2e-5, err_msg=name)
  measured = calibrate.time_layer(mesh, CONFIG, ids, repeats=2, warmup=1, backward=False)
  assert set(measured) == set(CANDIDATES)
  assert all(np.isfinite(t) and t > 0 for t in measured.values())


def test_measure_takes_the_median_of_interleaved_calls():
  calls = []
  steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
  out = calibrate.measure(steps, repeats=3, warmup=1)
  assert set(out) == {"a", "b", "c"} and all(t >= 0 for t in out.values())
  # warmup in order, then the order rotates every repeat
  assert calls == list("abc") + list("abc") + list("bca") + list("cab")


# ----------------------------------------------------------------------------- deciding

def test_the_first_decision_is_the_argmin_of_each_layer():
  tuner = AutoTuner(layers=3, candidates=CANDIDATES)
  record = tuner.decide(0, [times(2.0, 3.0), times(5.0, 1.0), times(4.0, 4.0)], reason="start")
  assert tuner.choices == ("flat_dedup", "hier_dedup", "flat_dedup")  # a tie: the first listed
  assert record["choices"] == list(tuner.choices) and record["changed"] == []
  json.dumps(record)  # a metrics.jsonl line


def test_scanned_layers_share_the_choice_with_the_least_total():
  tuner = AutoTuner(layers=2, candidates=CANDIDATES, shared=True)
  tuner.decide(0, [times(1.0, 2.0), times(5.0, 3.0)])  # totals: flat 6, hier 5
  assert tuner.choices == ("hier_dedup", "hier_dedup")


def test_noise_does_not_flap_the_choice():
  """Timings within the margin of each other, alternating which looks faster, never
  switch; nor does a single clear win followed by a loss."""
  tuner = AutoTuner(layers=1, candidates=CANDIDATES, margin=0.1, confirm=2)
  tuner.decide(0, [times(10.0, 10.5)])
  rng = np.random.default_rng(0)
  for step in range(1, 40):
    noise = rng.uniform(-0.04, 0.04, 2)
    tuner.decide(step, [times(10.0 * (1 + noise[0]), 10.0 * (1 + noise[1]))])
    assert tuner.choices == ("flat_dedup",)
  tuner.decide(40, [times(10.0, 5.0)])  # one clear win: pending only
  assert tuner.choices == ("flat_dedup",) and tuner.due(41) == "confirm"
  tuner.decide(41, [times(10.0, 10.2)])  # then not: the challenger is dropped
  assert tuner.choices == ("flat_dedup",) and tuner.due(42) is None


def test_a_clear_win_on_two_checks_in_a_row_switches():
  tuner = AutoTuner(layers=2, candidates=CANDIDATES, margin=0.1, confirm=2)
  tuner.decide(0, [times(1.0, 2.0), times(1.0, 2.0)])
  first = tuner.decide(5, [times(1.0, 2.0), times(1.0, 0.8)])
  assert tuner.choices == ("flat_dedup", "flat_dedup") and first["pending"] == {"1": "hier_dedup"}
  second = tuner.decide(6, [times(1.0, 2.0), times(1.0, 0.85)])
  assert tuner.choices == ("flat_dedup", "hier_dedup") and second["changed"] == [1]


def test_checks_are_due_at_start_on_request_on_cadence_and_on_drift():
  tuner = AutoTuner(layers=1, candidates=CANDIDATES, recheck_steps=10, drift_threshold=0.2)
  assert tuner.due(0) == "start"
  tuner.decide(0, [times(1.0, 2.0)])
  tuner.request("routing")
  assert tuner.due(1) == "routing"
  balanced = [np.full(16, 8)]
  tuner.decide(1, [times(1.0, 2.0)], counts=balanced)
  assert tuner.due(2, balanced) is None
  assert tuner.due(11, balanced) == "recheck"
  skewed = [np.r_[np.full(4, 28), np.zeros(12)]]  # a quarter each on 4: TV distance 0.75
  assert calibrate.drift(skewed[0], balanced[0]) == pytest.approx(0.75)
  assert tuner.due(3, skewed) == "drift"


def test_checks_keep_within_their_time_budget():
  """A check that took 600 ms, with 3 ms of MoE per step on a 5% budget, spaces the next
  re-check or drift check 600 / (0.05 * 3) = 4000 steps; a request still runs at once."""
  tuner = AutoTuner(layers=2, candidates=CANDIDATES, recheck_steps=10, budget=0.05)
  balanced, skewed = [np.full(16, 8)] * 2, [np.r_[np.full(4, 28), np.zeros(12)]] * 2
  record = tuner.decide(0, [times(1.0, 2.0), times(2.0, 3.0)], counts=balanced,
                        calibration_ms=600.0)
  assert tuner.min_gap == record["next_check_after_steps"] == 4000
  assert tuner.due(3999, skewed) is None
  assert tuner.due(4000, skewed) == "recheck"
  tuner.request("swap")
  assert tuner.due(1, balanced) == "swap"


@pytest.mark.parametrize("field, value", [("margin", -0.1), ("confirm", 0),
                                          ("recheck_steps", -1), ("drift_threshold", 0),
                                          ("budget", 0)])
def test_bad_tuner_settings_name_the_field(field, value):
  with pytest.raises(ConfigError, match=f"{field}={value!r} is invalid"):
    AutoTuner(layers=1, candidates=CANDIDATES, **{field: value})


@pytest.mark.parametrize("key, value", [("train.auto_margin", "1.5"),
                                        ("train.auto_drift", "0"),
                                        ("train.auto_recheck_steps", "-2"),
                                        ("train.auto_calibrate", "maybe")])
def test_bad_auto_keys_name_the_key(key, value):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    load_config(ROOT / "configs" / "tiny.yaml", [f"{key}={value}"])


# ------------------------------------------------------------------------------ trainer

def _tiny_auto(steps: int, *extra: str):
  return load_config(ROOT / "configs" / "tiny.yaml", [
      "mesh.nodes=2", "mesh.local=4", f"train.steps={steps}", "train.eval_every=0",
      "train.checkpoint_every=0", "train.batch_size=8", "train.seq_len=16",
      "model.d_model=32", "model.n_layers=1", "model.scan_layers=false", "moe.dispatch=auto",
      "moe.dropless=true",
      "train.auto_recheck_steps=1", *extra])


def _scripted(monkeypatch, script):
  """calibrate.time_layer replaced by crafted times: script[check][layer]."""
  calls = {"layer": 0, "check": 0}

  def fake(mesh, config, ids, **kwargs):
    check = script[min(calls["check"], len(script) - 1)]
    out = check[calls["layer"]]
    calls["layer"] += 1
    if calls["layer"] == len(check):
      calls["layer"], calls["check"] = 0, calls["check"] + 1
    return out
  monkeypatch.setattr(calibrate, "time_layer", fake)


def _decisions(records):
  return [d for r in records for d in r.get("auto_calibration", [])]


def test_trainer_recompiles_only_when_its_choice_changes(monkeypatch, tmp_path, cache_dir):
  """Checked every step (auto_recheck_steps=1): noise keeps one program; a clear win on
  two checks in a row switches, one more compile; then noise again."""
  # Scripted times of ~17 minutes: the checks' own time (under 1 s even on a loaded
  # machine) is far within their budget, so the budget never spaces them here.
  noise, win = [times(1e6, 1.05e6)], [times(1e6, 0.5e6)]
  # start (before step 1, uniform routing), then after each step 1..5 (not after the last)
  _scripted(monkeypatch, [noise, noise, noise, win, win, noise])
  result = run(_tiny_auto(6), tmp_path, verbose=False)
  decisions = _decisions(result.records)
  assert [d["reason"] for d in decisions] == ["start", "routing", "recheck", "recheck",
                                              "confirm", "recheck"]
  assert [d["compiled_programs"] for d in decisions] == [1, 1, 1, 1, 2, 2]
  assert decisions[4]["changed"] == [0] and decisions[5]["changed"] == []
  strategies = [r["strategy"] for r in result.records]  # what each step ran
  assert strategies == [["flat_dedup"]] * 4 + [["hier_dedup"]] * 2
  assert all(d["calibration_ms"] >= 0 for d in decisions)


def test_one_candidate_is_chosen_without_timing(monkeypatch):
  """On a one-node mesh only flat_dedup competes: nothing is timed or re-checked."""
  from models.steps import AutoDispatch, Model
  from models.train_loop import run_mesh
  monkeypatch.setattr(calibrate, "time_layer", lambda *a, **k: pytest.fail("timed"))
  cfg = _tiny_auto(2, "mesh.nodes=1", "mesh.local=8")
  auto = AutoDispatch(Model(cfg, run_mesh(cfg)))
  record = auto.check(0, None)
  assert record["reason"] == "one candidate" and record["choices"] == ["flat_dedup"]
  assert auto.check(1, None, ("ids",), np.ones((1, 16))) is None


# ------------------------------------------------------------------------ processes

def test_two_processes_reach_the_same_decision_from_different_local_times(tmp_path):
  """Each process alone would pick another strategy (tests/mp_worker_calibrate.py); the
  samples are reduced over processes, so both take the same one - the slowest
  process's fastest - and the real layer timing runs on the 2-process mesh."""
  command = [sys.executable, str(ROOT / "scripts" / "launch.py"), "--processes", "2",
             "--local-devices", "2", "--timeout", "150", "--",
             sys.executable, str(ROOT / "tests" / "mp_worker_calibrate.py"), str(tmp_path)]
  result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
  out = [json.loads((tmp_path / f"decision.{rank}.json").read_text()) for rank in range(2)]
  for key in ("times", "choices", "layer_times", "layer_choices"):
    assert out[0][key] == out[1][key], key
  assert out[0]["local_choice"] != out[1]["local_choice"]  # alone, they would differ
  assert out[0]["choices"] == ["hier_dedup"]
  assert set(out[0]["layer_times"]) == set(CANDIDATES)


# ------------------------------------------------------------------------- bench_comm

def test_bench_comm_auto_without_a_profile_calibrates(tmp_path, capsys):
  """Timed `auto` with no --profile times the candidates (the same calibrate code), runs
  the fastest as a plain program and reports the calibration time and the choice."""
  from hiermoe_jax.bench import comm
  out = tmp_path / "bench.json"
  code = comm.main(["--mesh", "2x4", "--experts", "16", "--topk", "4", "--tokens", "32",
                    "--hidden", "16", "--repeats", "3", "--warmup", "1",
                    "--strategies", "flat_dedup,hier_dedup,auto", "--json", str(out)])
  assert code == 0
  report = json.loads(out.read_text())
  calibrated = report["auto"]
  assert calibrated["mode"] == "calibrated" and calibrated["calibration_ms"] > 0
  assert set(calibrated["calibration_times_ms"]) == set(CANDIDATES)
  assert calibrated["choice"] == calibrate.fastest(calibrated["calibration_times_ms"],
                                                   CANDIDATES)
  auto = report["results"][2]
  assert auto["strategy"] == "auto" and auto["auto_choice"] == calibrated["choice"]
  assert auto["calibration_ms"] == calibrated["calibration_ms"] and auto["time_ms"]["median"] > 0
  assert f"auto calibrated on this mesh: {calibrated['choice']}" in capsys.readouterr().out
