"""train.py --profile-steps A:B: a jax.profiler trace of those steps in the run dir, with
the MoE block's named scopes; and the host-side auto on its real routing (same run)."""

from __future__ import annotations

import gzip
import json
import pathlib

import pytest

from hiermoe_jax import calibrate
from models import cli
from models.config import load_config
from models.train_loop import run

ROOT = pathlib.Path(__file__).resolve().parents[1]
# jax.named_scope names of the MoE block (hiermoe_jax/moe.py, dispatch/exchange.py)
SCOPES = ("router", "experts", "expert_compute")


def test_profile_steps_write_a_trace_with_the_named_scopes(tmp_path, cache_dir):
  """A 3-step tiny run (scanned), dispatch=auto calibrated on the host, trace of
  steps 2..3: the trace holds the block's scopes and the chosen strategy's dispatch
  and combine per tier; metrics.jsonl logs the decisions, one strategy for all layers."""
  cfg = load_config(ROOT / "configs" / "tiny.yaml", [
      "mesh.nodes=2", "mesh.local=4", "train.steps=3", "train.eval_every=0",
      "train.checkpoint_every=0", "train.batch_size=8", "train.seq_len=16",
      "model.d_model=32", "model.n_layers=1", "moe.dispatch=auto", "moe.dropless=true",
      "train.auto_recheck_steps=0"])
  result = run(cfg, tmp_path, verbose=False, profile_steps=(2, 3))
  traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and list((tmp_path / "profile").rglob("perfetto_trace.json.gz"))
  xplane = traces[0].read_bytes()
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  decisions = [d for r in records for d in r.get("auto_calibration", [])]
  reasons = [d["reason"] for d in decisions]
  # a challenger faster by the margin after step 1 is confirmed (or not) after step 2
  assert reasons[:2] == ["start", "routing"] and set(reasons[2:]) <= {"confirm"}
  for d in decisions:  # the argmin of the summed layer times, for every layer
    assert d["shared"] and len(set(d["choices"])) == 1 and d["calibration_ms"] > 0
    assert set(totals_of(d)) == {"flat_dedup", "hier_dedup"}
  assert decisions[0]["choices"][0] == calibrate.fastest(totals_of(decisions[0]),
                                                        ("flat_dedup", "hier_dedup"))
  for r in records:  # each step runs what the last decision before it chose
    assert r["strategy"] == [d for d in decisions if d["step"] < r["step"]][-1]["choices"]
  traced = {name for r in records[1:] for name in r["strategy"]}
  for chosen in traced:
    tiers = ("inter", "intra") if chosen == "hier_dedup" else ("flat",)
    for scope in tuple(f"{op}_{chosen}/{tier}" for op in ("dispatch", "combine")
                       for tier in tiers):
      assert scope.encode() in xplane, scope
  for scope in SCOPES:
    assert scope.encode() in xplane, scope
  with gzip.open(next((tmp_path / "profile").rglob("perfetto_trace.json.gz"))) as f:
    assert json.load(f)["traceEvents"]
  assert len(result.records) == 3


def totals_of(decision):
  return {n: sum(t[n] for t in decision["times_ms"]) for n in decision["times_ms"][0]}


@pytest.mark.parametrize("value", ["3", "0:2", "4:2", "a:b", "2:"])
def test_bad_profile_steps_is_a_one_line_error_naming_the_flag(value, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.parse_args(["--profile-steps", value])
  err = capsys.readouterr().err.strip()
  assert exit_info.value.code == 2
  assert err.startswith(f"error: --profile-steps={value!r} is invalid") and "1 <= A <= B" in err
  assert len(err.splitlines()) == 1


def test_profile_steps_parse():
  assert cli.parse_args(["--profile-steps", "2:5"]).profile_steps == (2, 5)
  assert cli.parse_args([]).profile_steps is None
