"""Timed mesh benchmark: strategies move the right data, and the CLI runs end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hiermoe_jax import cost
from hiermoe_jax.bench import synthetic
from hiermoe_jax.bench import timed
from hiermoe_jax.mesh import MeshShape
from tests.helpers import mesh_of, xla_flags

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("flat", "flat_dedup", "hier", "hier_dedup", "gspmd")


@pytest.mark.parametrize("mesh_name", ["2x4", "1x8"])
def test_every_strategy_round_trips_tokens(mesh_name):
  """Dispatch + stand-in experts + combine returns x * sum(w) = x (gspmd: 2x)."""
  mesh = mesh_of(mesh_name)
  shape = MeshShape.of(mesh)
  ids = synthetic.routing("zipf:1.0", devices=shape.devices, tokens=32, num_experts=16,
                          top_k=4, seed=1)
  x, slots, w = timed.routed_inputs(ids, 8, "float32", seed=0)
  args = [timed.global_array(mesh, a) for a in (x, slots, w, np.ones_like(x))]
  for name in STRATEGIES:
    if name == "gspmd":
      fn = timed.gspmd_step(mesh, group=16, capacity=timed.gspmd_capacity(ids, 16, 16),
                            num_experts=16, backward=False)
      scale = 2.0
    else:
      caps = timed.tight_hop_caps(ids, name, shape, 16)
      fn = timed.exchange_step(mesh, name, caps, 16, backward=False)
      scale = 1.0
    np.testing.assert_allclose(np.asarray(fn(*args)), scale * x, rtol=1e-5, atol=1e-5,
                               err_msg=name)


@pytest.mark.parametrize("kind", ["flat", "inter", "intra"])
def test_fit_stage_is_one_full_hop(kind):
  """stage_routing sends exactly `rows` rows to every peer of the hop, and the hop
  round-trips them: y_t = x_t * (sum of t's routed weights)."""
  mesh = mesh_of("2x4")
  shape = MeshShape.of(mesh)
  tokens, rows = 6, 7  # more rows per peer than tokens: stage_routing adds tokens
  ids = timed.stage_routing(shape, kind, tokens, rows)
  peers = cost.group_size(kind, shape)
  peer_of = {"flat": lambda e: e, "inter": lambda e: e // shape.local,
             "intra": lambda e: e % shape.local}[kind]
  for d in range(shape.devices):
    routed = ids[d][ids[d] >= 0]
    assert np.bincount(peer_of(routed), minlength=peers).tolist() == [rows] * peers
    for entries in ids[d]:  # dedup: a token sends one row per peer, so its peers differ
      token_peers = peer_of(entries[entries >= 0])
      assert len(set(token_peers.tolist())) == len(token_peers)
    if kind != "flat":  # the hop stays on its tier
      same = routed % shape.local == d % shape.local if kind == "inter" else \
          routed // shape.local == d // shape.local
      assert same.all()
  x, slots, w = timed.routed_inputs(ids, 4, "float32", seed=0)
  fn = timed.stage_step(mesh, kind, rows)
  y = np.asarray(fn(*(timed.global_array(mesh, a) for a in (x, slots, w, x))))
  np.testing.assert_allclose(y, x * np.where(slots >= 0, w, 0).sum(-1, keepdims=True),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh_name", ["2x4", "1x8"])
def test_fit_profile_on_mesh(mesh_name):
  """Every stage kind is timed and fitted, a local hop (inter on 1x8) included."""
  mesh = mesh_of(mesh_name)
  profile, details = timed.fit_profile(mesh, d_model=16, dtype="float32", max_bytes=64 * 1024,
                                       points=3, repeats=2, warmup=1, tokens=8)
  assert isinstance(profile, cost.CostProfile)
  assert set(details) == set(cost.STAGE_KINDS)
  assert all(len(d["bytes"]) == 3 for d in details.values())


def test_fit_sweep_reaches_small_messages():
  """The fitted sizes span max_bytes / FIT_SPAN .. max_bytes, so the trainer's small
  stages (T=512, D=512: ~0.5-2 MB) are measured by a 64 MB sweep, not extrapolated."""
  d, bpe, group = 1024, 4, 8
  rows = timed._fit_rows(64_000_000, 10, group, d, bpe)
  sizes = [cost.stage_bytes(group, r, d, bpe) for r in rows]
  assert len(rows) == 10 and sizes == sorted(sizes)
  assert sizes[0] == pytest.approx(64e6 / timed.FIT_SPAN, rel=0.05)
  assert sizes[-1] == pytest.approx(64e6, rel=0.01)
  assert np.allclose(np.diff(np.log(sizes)), np.log(timed.FIT_SPAN) / 9, rtol=0.1)


def _run_cli(tmp_path, *extra):
  env = dict(os.environ, XLA_FLAGS=xla_flags(),
             JAX_PLATFORMS="cpu")
  out = tmp_path / "bench.json"
  cmd = [sys.executable, str(ROOT / "scripts" / "bench_comm.py"), "--mesh", "2x4",
         "--experts", "16", "--topk", "4", "--tokens", "32", "--hidden", "16",
         "--repeats", "2", "--warmup", "1", "--gspmd-group", "16", "--json", str(out), *extra]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
  return proc, out


def test_cli_end_to_end(tmp_path):
  fitted = tmp_path / "fitted.json"
  proc, out = _run_cli(tmp_path, "--strategies", ",".join(STRATEGIES), "--backward",
                       "--fit-profile", str(fitted), "--fit-points", "3",
                       "--fit-max-mb", "0.05")
  assert proc.returncode == 0, proc.stderr
  report = json.loads(out.read_text())
  assert [r["strategy"] for r in report["results"]] == list(STRATEGIES)
  for r in report["results"]:
    assert set(r["time_ms"]) == {"min", "median", "max"}
    assert r["time_ms"]["min"] <= r["time_ms"]["median"] <= r["time_ms"]["max"]
    assert r["predicted_ms"] > 0
    assert "max_rows_per_peer" in r  # the analytic schema is kept
  assert cost.load_profile(str(fitted)).name.startswith("fitted on mesh 2x4")
  assert "vs flat" in proc.stdout


def test_cli_rejects_unknown_strategy(tmp_path):
  proc, _ = _run_cli(tmp_path, "--strategies", "flat,alltoall")
  assert proc.returncode == 2
  assert "'alltoall' is not one of" in proc.stderr


def test_cli_times_auto_with_the_strategy_it_picks(tmp_path):
  proc, out = _run_cli(tmp_path, "--strategies", "flat,auto", "--profile", "paper_a6000")
  assert proc.returncode == 0, proc.stderr
  auto = json.loads(out.read_text())["results"][1]
  assert auto["strategy"] == "auto" and auto["auto_choice"] in STRATEGIES[:4]
  assert auto["time_ms"]["median"] > 0 and auto["predicted_ms"] > 0
  assert f"auto:{auto['auto_choice']}" in proc.stdout
