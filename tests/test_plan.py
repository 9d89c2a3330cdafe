"""models/plan.py (scripts/plan.py): the trainer's train step compiled for 2x8 H200 here."""

import importlib.util
import json
import math
import pathlib
import re

import jax
import pytest

from helpers import skip_without_gpu_aot

# The CUDA plugin registers compile-only devices with JAX_PLATFORMS=cpu (conftest).
skip_without_gpu_aot()

from hiermoe_jax import gpu_aot  # noqa: E402
from hiermoe_jax.config import ConfigError  # noqa: E402
from models import plan as plan_lib  # noqa: E402
from models.config import load_config  # noqa: E402
from models.steps import Model  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY, SMALL = str(ROOT / "configs" / "tiny.yaml"), str(ROOT / "configs" / "small.yaml")
GiB, MiB = 1 << 30, 1 << 20
NODES, LOCAL = 2, 8
NODE_GROUPS = [[i, LOCAL + i] for i in range(LOCAL)]  # same local index, each process
LOCAL_GROUPS = [list(range(n * LOCAL, (n + 1) * LOCAL)) for n in range(NODES)]
# configs/small.yaml's train step on 2x8 H200 measured 185,322,881 bytes (176.7 MiB) per
# device for its larger host-side auto candidate (hier_dedup; flat_dedup 185,292,545):
# arguments 37.8 MiB (params and AdamW moments, donated), temporaries 138.9 MiB.
# The bound is ~1.25x that; raise it only for a change that needs the memory.
SMALL_BOUND_BYTES = 225 * MiB


def _plan(tmp_path, *args):
  """scripts/plan.py in this process: (exit code, the JSON it wrote)."""
  out = tmp_path / "plan.json"
  code = plan_lib.main([*args, "--json", str(out)])
  return code, json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return _plan(tmp_path_factory.mktemp("tiny"), "--config", TINY, "--gpu", "h200", "--mesh", "2x8")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  return _plan(tmp_path_factory.mktemp("small"), "--config", SMALL, "--gpu", "h200",
               "--mesh", "2x8")


def _one_line_error(capsys, argv, code=2) -> str:
  with pytest.raises(SystemExit) as exit_:
    plan_lib.main(argv)
  assert exit_.value.code == code
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  return err


def test_tiny_fits_on_2x8_h200(tiny):
  code, plan = tiny
  assert code == 0 and plan["fits"] is True
  assert (plan["gpu"], plan["mesh"]) == ("h200", {"nodes": 2, "local": 8, "devices": 16})
  assert plan["batch"] == {"batch_size": 16, "seq_len": 64} and plan["compile_s"] > 0
  m = plan["memory"]
  assert m["device_bytes"] == 141 * GiB
  assert m["total_bytes"] == (m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"]
                              + m["temp_bytes"])
  # The arguments are exactly one device's shards of the train state and the batch.
  cfg = load_config(TINY, ["mesh.nodes=2", "mesh.local=8"])
  model = Model(cfg, gpu_aot.mesh("h200", NODES, LOCAL))
  leaves = [*jax.tree.leaves(model.abstract_state()), *plan_lib.abstract_batch(model)]
  shard_bytes = sum(leaf.dtype.itemsize * math.prod(leaf.sharding.shard_shape(leaf.shape))
                    for leaf in leaves)
  assert m["argument_bytes"] == shard_bytes
  assert 0 < m["alias_bytes"] <= m["argument_bytes"]  # the state is donated
  assert 0 < m["total_bytes"] < 16 * MiB


def test_report_groups_identical_collectives(tiny, capsys):
  _, plan = tiny
  assert sum(g["count"] for g in plan["collective_groups"]) == len(plan["collectives"])
  assert len(plan["collective_groups"]) < len(plan["collectives"])
  print(plan_lib.report(plan))
  out = capsys.readouterr().out
  assert "fits" in out and "NVIDIA H200" in out
  kinds = "|".join(gpu_aot.COLLECTIVES)
  rows = [line for line in out.splitlines() if re.match(rf"\s+\d+\s+({kinds})\s", line)]
  assert len(rows) == len(plan["collective_groups"])


def test_mid_size_stays_under_its_memory_bound(small):
  code, plan = small
  assert code == 0 and plan["fits"]
  assert plan["memory"]["total_bytes"] < SMALL_BOUND_BYTES, plan["memory"]
  # small decides its strategy on the host: each candidate compiled, the largest planned.
  assert load_config(SMALL).moe.dispatch == "auto"
  assert set(plan["auto_candidates"]) == {"flat_dedup", "hier_dedup"}
  assert plan["memory"]["total_bytes"] == max(plan["auto_candidates"].values())


def test_hier_dedup_talks_inter_and_intra_node_and_gathers_no_expert_weights(tiny):
  _, plan = tiny
  cfg = load_config(TINY)
  assert cfg.moe.dispatch == "hier_dedup" and plan["auto_candidates"] == {}
  a2a = [c for c in plan["collectives"] if c["kind"] in ("all-to-all", "ragged-all-to-all")]
  assert any(c["replica_groups"] == NODE_GROUPS and c["label"] == "inter-node" for c in a2a)
  assert any(c["replica_groups"] == LOCAL_GROUPS and c["label"] == "intra-node" for c in a2a)
  # No expert stack is gathered: [E / devices or E, D, F] (or F, D) in any dtype.
  e, d, f = cfg.moe.num_experts, cfg.model.d_model, cfg.moe.d_ff
  experts = {(x, *dims) for x in (e // (NODES * LOCAL), e) for dims in ((d, f), (f, d))}
  gathered = [(c["name"], shape) for c in plan["collectives"] if c["kind"] == "all-gather"
              for shape in c["operand_shapes"] if _dims(shape) in experts]
  assert not gathered


def test_does_not_fit_is_exit_1_with_one_line(tiny, capsys):
  _, plan = tiny
  over = dict(plan, fits=False,
              memory=dict(plan["memory"], total_bytes=plan["memory"]["device_bytes"] + GiB))
  assert plan_lib.finish(over, None) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and re.match(
      r"error: does not fit: the train step needs 142\.00 GiB per device on --mesh 2x8, a "
      r"--gpu h200 \(NVIDIA H200 141GB HBM3e\) has 141\.00 GiB\n$", err), err


def test_unknown_gpu(capsys):
  err = _one_line_error(capsys, ["--config", TINY, "--gpu", "a100", "--mesh", "2x8"])
  assert "--gpu='a100' is invalid: must be one of h100, h200, b200" in err


def test_mesh_must_divide_the_experts_and_the_batch(capsys):
  err = _one_line_error(capsys, ["--config", TINY, "--gpu", "h200", "--mesh", "2x3"])
  assert "--mesh=2x3 does not fit the config: moe.num_experts=16 is invalid" in err
  err = _one_line_error(capsys, ["--config", TINY, "--gpu", "h200", "--mesh", "4x8",
                                 "--set", "moe.num_experts=32"])
  assert "--mesh=4x8 does not fit the config: train.batch_size=16 is invalid" in err


def test_bad_mesh_option_and_config_key(capsys):
  err = _one_line_error(capsys, ["--config", TINY, "--gpu", "h200", "--mesh", "2y8"])
  assert "--mesh='2y8' is invalid: expected NxG" in err
  err = _one_line_error(capsys, ["--config", TINY, "--gpu", "h200", "--mesh", "2x8",
                                 "--set", "train.lr=abc"])
  assert "train.lr='abc' is invalid" in err


def test_plugin_missing_says_how_to_install(capsys, monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "jax_cuda12_plugin" else find_spec(name, *a))
  err = _one_line_error(capsys, ["--config", TINY, "--gpu", "h200", "--mesh", "2x8"])
  assert 'jax-cuda12-plugin, which is not installed: pip install -e ".[gpu-aot]"' in err


def test_target_comment_is_the_default_cluster(tmp_path, capsys):
  for preset, mesh in (("qwen3_30b_a3b", (4, 8)), ("deepseek_v3_moe_shapes", (8, 8))):
    assert plan_lib.read_target(ROOT / "configs" / f"{preset}.yaml") == {
        "gpu": "h200", "mesh": mesh}
  err = _one_line_error(capsys, ["--config", TINY, "--mesh", "2x8"])
  assert "--gpu is required: " in err and "'# target: gpu=... mesh=NxG'" in err
  bad = tmp_path / "bad.yaml"
  bad.write_text("# target: gpu=a100 mesh=2x8\nmodel:\n  d_model: 64\n")
  err = _one_line_error(capsys, ["--config", str(bad)])
  assert "gpu='a100' is invalid: must be one of h100, h200, b200" in err
  with pytest.raises(ConfigError, match=r"'nodes=2' is invalid: expected key=value with key"):
    bad.write_text("# target: gpu=h200 nodes=2\n")
    plan_lib.read_target(bad)


def _dims(shape: str) -> tuple[int, ...]:
  match = re.fullmatch(r"[a-z]+\d*[a-z0-9]*\[([\d,]*)\]", shape)
  return tuple(int(v) for v in match[1].split(",") if v) if match else ()
