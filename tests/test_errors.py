"""Bad input gives one line naming the field or option, the value and what is valid.

Every MoEConfig field and every run-config key has at least one invalid value here
(a coverage check fails when a field is added without one). The CLIs run in-process
through their `main(argv)`: exit code 2, one stderr line, no traceback, and no step
function built (validation happens before any compilation). Three cases run as real
subprocesses to show the same reaches a user at the shell.
"""

import dataclasses
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import hiermoe_jax as hm
from hiermoe_jax import cost
from hiermoe_jax.bench import cli
from hiermoe_jax.bench import kernels as bench_kernels
from hiermoe_jax.config import ConfigError
from models import cli as train_cli
from models import config as run_config
from models import plot_metrics
from helpers import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
BASE = dict(d_model=16, d_ff=32, num_experts=8, top_k=2)


def assert_one_line(message: str, *names: str) -> None:
  assert "\n" not in message.strip() and "Traceback" not in message, message
  for name in names:
    assert name in message, (name, message)


# ------------------------------------------------------------------------- MoEConfig

MOE_CASES = [
    ("d_model", 0), ("d_model", True), ("d_ff", -1), ("d_ff", 2.5), ("num_experts", "8"),
    ("top_k", 0), ("top_k", 9), ("router", "topk"), ("norm_topk_prob", "yes"),
    ("n_group", 2), ("n_group", 0), ("topk_group", 0), ("routed_scaling_factor", math.inf),
    ("routed_scaling_factor", math.nan), ("n_shared_experts", -1), ("n_shared_experts", True),
    ("shared_d_ff", 0), ("shared_gate", 1), ("shared_gate", True), ("capacity_factor", math.inf),
    ("capacity_factor", 0.0), ("capacity_factor", "1.25"), ("dropless", None),
    ("dispatch", "alltoall"), ("cost_profile", ""), ("dtype", "int8"),
    ("param_dtype", "float64"), ("load_balance_weight", -1.0),
    ("load_balance_weight", math.nan), ("z_loss_weight", math.inf),
    ("bias_update_rate", -0.1), ("bias_update_rate", 0.01), ("expert_compute", "loop"),
    ("permute_impl", "cuda"), ("all_to_all", "nccl"), ("expert_axes", ("node", "node")),
    ("batch_axes", ("node",)), ("tensor_axis", "local"), ("comm_dtype", "int8"),
    ("comm_dtype", "float16"), ("overlap_chunks", 0), ("overlap_chunks", 2.0),
]


@pytest.mark.parametrize("field, value", MOE_CASES)
def test_moe_config_field_error_is_one_line(field, value):
  with pytest.raises(ConfigError) as e:
    hm.MoEConfig(**{**BASE, field: value})
  assert_one_line(str(e.value), f"MoEConfig.{field}=", "is invalid")


def test_every_moe_config_field_has_an_invalid_case():
  assert {f.name for f in dataclasses.fields(hm.MoEConfig)} == {f for f, _ in MOE_CASES}


@pytest.mark.parametrize("profile", ["missing", "/nonexistent/profile.json"])
def test_auto_dispatch_checks_its_cost_profile_before_tracing(profile):
  """The config reads no file: moe_apply loads the profile, outside jit tracing."""
  config = hm.MoEConfig(**BASE, dispatch="auto", cost_profile=profile)
  mesh = hm.make_mesh(1, 1, devices=jax.devices()[:1])
  params = hm.init_params(jax.random.key(0), config, mesh)
  with pytest.raises(ConfigError) as e:
    hm.moe_apply(params, jnp.zeros((4, BASE["d_model"])), config=config, mesh=mesh)
  assert_one_line(str(e.value), f"MoEConfig.cost_profile={profile!r} is invalid")
  assert hm.MoEConfig(**BASE, cost_profile=profile).cost_profile == profile  # unused: kept


@pytest.mark.parametrize("key, value", [
    ("n_group", "abc"), ("routed_scaling_factor", "high"), ("norm_topk_prob", "yes"),
    ("n_shared_experts", 1.5)])
def test_hf_config_value_error_names_the_hf_key(key, value):
  deepseek = {"model_type": "deepseek_v3", "hidden_size": 64, "moe_intermediate_size": 32,
              "n_routed_experts": 16, "num_experts_per_tok": 2, key: value}
  with pytest.raises(ConfigError) as e:
    hm.MoEConfig.from_hf(deepseek)
  assert_one_line(str(e.value), f"{key}={value!r} is invalid")


def test_make_mesh_error_is_a_config_error():
  with pytest.raises(ConfigError) as e:
    hm.make_mesh(3, 4)
  assert_one_line(str(e.value), "nodes=3", "local=4")
  with pytest.raises(ConfigError, match="nodes=True is invalid"):
    hm.make_mesh(True, 8)


# ----------------------------------------------------------- run config (models.config)

RUN_CASES = {
    "model": {"vocab_size": "0", "d_model": "-1", "n_layers": "0", "n_heads": "0",
              "n_kv_heads": "3", "head_dim": "7", "d_ff": "0", "first_k_dense": "9",
              "qk_norm": "maybe", "rope_theta": "inf", "norm_eps": "0",
              "tie_embeddings": "2", "dtype": "int8", "param_dtype": "float64",
              "attention": "flash", "remat": "some", "scan_layers": "maybe",
              "dense_sharding": "zero3"},
    "moe": {"d_ff": "0", "num_experts": "x", "top_k": "99", "router": "topk",
            "norm_topk_prob": "maybe", "n_group": "3", "topk_group": "0",
            "routed_scaling_factor": "nan", "n_shared_experts": "-1", "shared_d_ff": "0",
            "shared_gate": "true", "capacity_factor": "inf", "dropless": "2",
            "dispatch": "teleport", "cost_profile": "", "dtype": "int8",
            "param_dtype": "int4", "load_balance_weight": "-1", "z_loss_weight": "inf",
            "bias_update_rate": "nan", "expert_compute": "loop", "permute_impl": "cuda",
            "all_to_all": "nccl", "comm_dtype": "int8", "overlap_chunks": "0"},
    "train": {"batch_size": "0", "seq_len": "-4", "steps": "1.5", "lr": "inf",
              "warmup_steps": "-1", "min_lr_ratio": "2", "weight_decay": "nan", "b1": "1",
              "b2": "-0.1", "grad_clip": "0", "seed": "-1", "eval_every": "-1",
              "eval_batches": "0", "checkpoint_every": "-5", "keep": "0",
              "swap_interval": "-1", "swap_window": "-1", "swap_max_pairs": "-1",
              "swap_profile": "", "swap_migration_cost": "maybe", "swap_max_interval": "-1",
              "swap_grow_pairs": "maybe", "swap_groups": "maybe", "on_nan": "maybe",
              "swap_compute_ms_per_pair": "-0.5", "swap_exact_peaks": "maybe",
              "nan_skip_limit": "-1", "drop_warning": "1.5", "loss_chunk": "-1",
              "microbatches": "0", "auto_calibrate": "maybe", "auto_recheck_steps": "-1",
              "auto_margin": "1", "auto_drift": "0", "auto_budget": "0",
              "routing_trace": "t.npy",
              "routing_trace_steps": "0"},
    "data": {"path": "", "eval_fraction": "1", "token_dtype": "int8"},
    "mesh": {"nodes": "0", "local": "-1"},
}


@pytest.mark.parametrize("key, value", [
    (f"{section}.{key}", value) for section, keys in RUN_CASES.items()
    for key, value in keys.items()])
def test_run_config_key_error_is_one_line(key, value):
  with pytest.raises(ConfigError) as e:
    run_config.load_config(TINY, [f"{key}={value}"])
  assert_one_line(str(e.value), f"{key}=", "is invalid")


def test_every_run_config_key_has_an_invalid_case():
  for section, cls in run_config.SECTIONS.items():
    names = {f.name for f in dataclasses.fields(cls)} - (
        set(run_config.MOE_SET_BY_TRAINER) if section == "moe" else set())
    assert names == set(RUN_CASES[section]), section


@pytest.mark.parametrize("key, value", [
    ("train.seed", str(2 ** 63)),  # jax.random.key overflows past a C long
    ("train.swap_profile", "/nonexistent.json"),  # loaded up front when swaps are on
    ("train.swap_max_interval", "1"),  # below train.swap_interval
])
def test_run_config_limits_checked_up_front(key, value):
  with pytest.raises(ConfigError) as e:
    run_config.load_config(TINY, [f"{key}={value}", "train.swap_interval=2"])
  assert_one_line(str(e.value), f"{key}=", "is invalid")


@pytest.mark.parametrize("text, message", [
    (None, "does not exist"),
    ("moe:\n  top_k: 2\n bad\n", "not valid YAML at line 3"),
    ("moe: [1, 2]\n", "section 'moe' must be a mapping"),
    ("- 1\n", "must hold a mapping"),
    (b"\xff\xfe", "not a UTF-8 text file"),
])
def test_bad_config_file_is_one_line(tmp_path, text, message):
  path = tmp_path / "run.yaml"
  if isinstance(text, bytes):
    path.write_bytes(text)
  elif text is not None:
    path.write_text(text)
  with pytest.raises(ConfigError) as e:
    run_config.load_config(path)
  assert_one_line(str(e.value), message)


def test_config_path_that_is_a_directory(tmp_path):
  with pytest.raises(ConfigError, match="cannot be read: Is a directory"):
    run_config.load_config(tmp_path)


def test_bad_cost_profile_file_is_a_config_error(tmp_path):
  path = tmp_path / "p.json"
  path.write_text('{"flat": {"alpha_ms": NaN, "beta_ms_per_byte": 0}}')
  with pytest.raises(ConfigError) as e:
    cost.load_profile(str(path))
  assert_one_line(str(e.value), "flat.alpha_ms=nan is invalid")


# ------------------------------------------------------------------------------- CLIs

@pytest.fixture
def no_compile(monkeypatch):
  """Fails the test if a bad-input case reaches the step builders or the model."""
  from hiermoe_jax.bench import timed
  from models import train_loop

  def refuse(*args, **kwargs):
    raise AssertionError("a step was built before the input was validated")
  for name in ("exchange_step", "auto_step", "gspmd_step", "stage_step"):
    monkeypatch.setattr(timed, name, refuse)
  monkeypatch.setattr(train_loop, "Model", refuse)


def run_main(main, argv, capsys) -> tuple[int, str]:
  try:
    code = main(argv)
  except SystemExit as e:
    code = e.code
  return code, capsys.readouterr().err.strip()


ANALYTIC = ["--analytic", "--experts", "16", "--topk", "2", "--tokens", "64", "--hidden", "8"]
TIMED = ["--experts", "16", "--topk", "2", "--tokens", "64", "--hidden", "8", "--repeats", "1"]


@pytest.mark.parametrize("argv, names", [
    (ANALYTIC + ["--mesh", "2y4"], ["--mesh='2y4' is invalid", "NxG"]),
    (ANALYTIC + ["--experts", "0"], ["--experts='0' is invalid", ">= 1"]),
    (ANALYTIC + ["--topk", "99"], ["--topk=99 is invalid", "--experts=16"]),
    (ANALYTIC + ["--mesh", "3x4"], ["--experts=16 is invalid", "12 devices"]),
    (ANALYTIC + ["--routing", "zipf:abc"], ["--routing", "zipf:abc", ">= 0"]),
    (ANALYTIC + ["--routing", "zipf:inf"], ["--routing='zipf:inf' is invalid"]),
    (ANALYTIC + ["--routing", "file:missing.npy"], ["--routing=", "does not exist"]),
    (ANALYTIC + ["--strategies", "flat,teleport"], ["--strategies=", "'teleport' is not one of"]),
    (ANALYTIC + ["--strategies", "auto", "--profile", "nope"], ["--profile='nope' is invalid"]),
    (ANALYTIC + ["--capacity-factor", "inf"], ["--capacity-factor='inf' is invalid", "> 0"]),
    (ANALYTIC + ["--seed", "-1"], ["--seed='-1' is invalid"]),
    (ANALYTIC + ["--json", "no_such_dir/out.json"], ["--json=", "does not exist"]),
    (ANALYTIC + ["--bogus"], ["unrecognized arguments: --bogus"]),
    (TIMED + ["--repeats", "0"], ["--repeats='0' is invalid", ">= 1"]),
    (TIMED + ["--warmup", "-1"], ["--warmup='-1' is invalid", ">= 0"]),
    (TIMED + ["--dtype", "float64"], ["--dtype", "invalid choice: 'float64'"]),
    (TIMED + ["--profile", "nope"], ["--profile='nope' is invalid"]),
    (TIMED + ["--fit-profile", "f.json", "--fit-points", "1"], ["--fit-points='1'", ">= 2"]),
    (TIMED + ["--fit-profile", "f.json", "--fit-max-mb", "nan"], ["--fit-max-mb='nan'"]),
    (TIMED + ["--mesh", "4x4"], ["--mesh=4x4 is invalid", "16 devices"]),
    (TIMED + ["--experts", "12"], ["--experts=12 is invalid", "8 devices"]),
    (TIMED + ["--mesh", "2x4", "--fit-profile", "f.json", "--fit-only", "--fit-max-mb", "1e-6"],
     ["is invalid", "--fit-max-mb"]),
])
def test_bench_comm_errors(argv, names, capsys, no_compile, tmp_path, monkeypatch):
  from hiermoe_jax.bench import comm
  monkeypatch.chdir(tmp_path)
  code, err = run_main(comm.main, argv, capsys)
  assert code == 2
  assert_one_line(err, "error: ", *names)


def test_bench_comm_rejects_a_malformed_routing_file(tmp_path, capsys):
  import numpy as np

  from hiermoe_jax.bench import comm
  path = tmp_path / "ids.npy"
  np.save(path, np.zeros((8, 64, 3), np.int32))  # K=3, but --topk 2
  code, err = run_main(comm.main, ANALYTIC + ["--routing", f"file:{path}"], capsys)
  assert code == 2
  assert_one_line(err, "--routing=", "--topk=2")


SWAP = ["--mesh", "2x4", "--experts", "16", "--topk", "2", "--tokens", "32", "--hidden", "8",
        "--steps", "2", "--repeats", "1"]


@pytest.mark.parametrize("argv, names", [
    (["--routing", "uniform"], ["--routing='uniform' is invalid", "zipf:ALPHA"]),
    (["--topk", "99"], ["--topk=99 is invalid"]),
    (["--profile", "nope"], ["--profile='nope' is invalid"]),
    (["--affinity", "nan"], ["--affinity='nan' is invalid"]),
    (["--drift", "-1"], ["--drift='-1' is invalid"]),
    (["--window", "0"], ["--window='0' is invalid"]),
    (["--swap-interval", "4", "--max-interval", "2"], ["--max-interval=2 is invalid"]),
    (["--seed", str(2 ** 64)], ["--seed=", "is invalid"]),
    (["--experts", "12"], ["--experts=12 is invalid", "8 devices"]),
    (["--mesh", "4x4"], ["--mesh=4x4 is invalid"]),
])
def test_bench_swap_errors(argv, names, capsys, no_compile):
  from hiermoe_jax.bench import swap
  code, err = run_main(swap.main, SWAP + argv, capsys)
  assert code == 2
  assert_one_line(err, "error: ", *names)


@pytest.mark.parametrize("argv, names", [
    (["--sizes", "0x256"], ["--sizes='0x256' is invalid", "TxD"]),
    (["--sizes", "1024x256,abc"], ["--sizes=", "'abc'"]),
    (["--repeats", "0"], ["--repeats='0' is invalid"]),
    (["--top-k", "-1"], ["--top-k='-1' is invalid"]),
    (["--peak-gbps", "inf"], ["--peak-gbps='inf' is invalid"]),
    (["--dtype", "int8"], ["--dtype", "invalid choice"]),
    (["--json", "no_such_dir/k.json"], ["--json=", "does not exist"]),
])
def test_bench_kernels_errors(argv, names, capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  code, err = run_main(bench_kernels.main, argv, capsys)
  assert code == 2
  assert_one_line(err, "error: ", *names)


def test_plot_metrics_errors(tmp_path, capsys):
  main = plot_metrics.main
  code, err = run_main(main, [str(tmp_path / "missing")], capsys)
  assert code == 2 and "metrics.jsonl does not exist" in err
  (tmp_path / "metrics.jsonl").write_text("{oops\n")
  code, err = run_main(main, [str(tmp_path)], capsys)
  assert code == 2
  assert_one_line(err, "metrics.jsonl is not JSON lines")
  code, err = run_main(main, [str(tmp_path), "--out", str(tmp_path / "metrics.jsonl")], capsys)
  assert code == 2
  assert_one_line(err, "--out=", "is a file")


@pytest.mark.parametrize("argv, names", [
    (["--config", "missing.yaml"], ["config file 'missing.yaml' does not exist"]),
    (["--config", "."], ["config file '.' cannot be read"]),
    (["--data", "missing/"], ["data.path='missing/' is invalid"]),
    (["--data", ""], ["data.path='' is invalid"]),
    (["--capacity-factor", "inf"], ["moe.capacity_factor=inf is invalid", "finite"]),
    (["--set", "train.lr=nan"], ["train.lr=nan is invalid"]),
    (["--set", "moe.dispatch=auto", "--set", "moe.cost_profile=nope"],
     ["moe.cost_profile='nope' is invalid"]),
    (["--set", "train.seed=99999999999999999999"], ["train.seed=", "is invalid"]),
    (["--set", "moe.norm_topk_prob=maybe"], ["moe.norm_topk_prob='maybe' is invalid"]),
])
def test_train_config_errors(argv, names, capsys, no_compile, tmp_path, monkeypatch):
  argv = ["--config", str(TINY), "--run-dir", str(tmp_path / "run")] + argv
  monkeypatch.chdir(tmp_path)
  code, err = run_main(train_cli.main, argv, capsys)
  assert code == 2
  assert_one_line(err, "error: ", *names)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, names", [
    (["--mesh", "2y4"], ["--mesh='2y4' is invalid"]),
    (["--steps", "abc"], ["--steps", "'abc'"]),
    (["--stop-after", "0"], ["--stop-after='0' is invalid"]),
    (["--on-nan", "ignore"], ["--on-nan", "'ignore'"]),
    (["--run-dir", str(TINY)], ["--run-dir=", "is a file"]),
])
def test_train_option_errors(argv, names, capsys, no_compile):
  code, err = run_main(train_cli.main, argv, capsys)
  assert code == 2
  assert_one_line(err, "error: ", *names)


# ------------------------------------------------------------------------ cli helpers

def test_cli_parser_error_is_one_line(capsys):
  p = cli.ArgumentParser(prog="x")
  p.add_argument("--n", type=cli.integer(1, 8))
  p.add_argument("--f", type=cli.real(0, strict=True))
  for argv, expected in [(["--n", "9"], "error: --n='9' is invalid: must be an integer in [1, 8]"),
                         (["--f=-inf"], "error: --f='-inf' is invalid: must be a finite "
                                           "number > 0"),
                         (["--n"], "error: argument --n: expected one argument")]:
    with pytest.raises(SystemExit) as e:
      p.parse_args(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err == expected + "\n"
  assert cli.mesh_shape(" 2X4 ") == (2, 4)


# ----------------------------------------------------------------- real subprocesses

CUDA_PLUGIN_LOG = re.compile(r"cudart_stub\.cc:\d+\] Could not find cuda drivers|"
                             r"^WARNING: All log messages before absl::InitializeLog")


def test_no_traceback_reaches_the_shell(tmp_path):
  """The scripts' own entry points (`sys.exit(main())`), run concurrently."""
  env = {**os.environ, "XLA_FLAGS": xla_flags()}
  commands = {
      "moe.capacity_factor=inf": ["scripts/train.py", "--config", str(TINY), "--run-dir",
                                  str(tmp_path / "run"), "--set", "moe.capacity_factor=inf"],
      "--mesh='2y4' is invalid": ["scripts/bench_comm.py", "--analytic", "--mesh", "2y4"],
      "--profile='nope' is invalid": ["scripts/bench_swap.py", "--mesh", "2x4", "--profile",
                                      "nope"],
  }
  procs = {name: subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for name, cmd in commands.items()}
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    # With the gpu-aot extra installed, the CUDA plugin's C++ logs that it finds no
    # driver when JAX starts; that is not the script's output.
    lines = [line for line in err.splitlines()
             if line.strip() and not CUDA_PLUGIN_LOG.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert_one_line(lines[0], name)
