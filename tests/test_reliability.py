"""Reliability of the trainer (issue #8): NaN/Inf steps, kill -9 during a save,
SIGTERM / SIGINT, and damaged checkpoints.

The kill and signal tests run scripts/train.py as real processes, the others run
in-process; all use the same one-layer model on a 1x8 mesh and the same step count
(the LR schedule is part of the program), so the persistent compilation cache
compiles the train step once for all of them.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from models import cli
from models import data as data_lib
from models.checkpoint import Checkpointer
from models.config import ConfigError, load_config
from models.metrics import read_metrics
from models.steps import Model
from models.train_loop import NonFiniteError, run, run_mesh, save_checkpoint
from helpers import xla_flags
from test_train import ROOT, TINY

STEPS = 30  # runs stop (or are stopped) well before it
SMALL = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "moe.d_ff=32",
         "moe.num_experts=8", "train.seq_len=16", "train.batch_size=8",
         "train.eval_every=0", "train.warmup_steps=2", f"train.steps={STEPS}",
         "mesh.nodes=1", "mesh.local=8"]


# ------------------------------------------------------------------------- helpers

def in_process(*overrides):
  return load_config(TINY, SMALL + ["train.checkpoint_every=1", *overrides])


def cli_main(*args) -> int:
  """scripts/train.py's main() (models.cli) in this process, on SMALL."""
  argv = ["--config", str(TINY), *args]
  for item in SMALL:
    argv += ["--set", item]
  return cli.main(argv)


def restored(cfg, run_dir, steps):
  """The TrainStates checkpointed at `steps`, on the host."""
  abstract = Model(cfg, run_mesh(cfg)).abstract_state()
  checkpointer = Checkpointer(run_dir, keep=10)
  try:
    return [jax.device_get(checkpointer.restore(s, abstract).state) for s in steps]
  finally:
    checkpointer.close()


def counts(opt_state) -> list[int]:
  """The optimizer's update counters (Adam's and the schedule's)."""
  return [int(x) for x in jax.tree.leaves(opt_state) if np.ndim(x) == 0]


def step_dirs(run_dir) -> list[int]:
  """Committed checkpoint steps (Orbax renames a step's tmp directory when complete)."""
  return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def tmp_dirs(run_dir) -> list[str]:
  return [p.name for p in (run_dir / "checkpoints").iterdir()
          if ".orbax-checkpoint-tmp" in p.name]


def metrics_lines(run_dir) -> int:
  path = run_dir / "metrics.jsonl"
  return path.read_text().count("\n") if path.exists() else 0


class Cli:
  """scripts/train.py on SMALL as a process; stderr goes to a file."""

  def __init__(self, run_dir, cache_dir, *args):
    self.log = run_dir.parent / f"{run_dir.name}.{time.monotonic_ns()}.stderr"
    env = {**os.environ, "XLA_FLAGS": xla_flags(),
           "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(TINY),
           "--run-dir", str(run_dir), *args]
    for item in SMALL:
      cmd += ["--set", item]
    with open(self.log, "w") as err:
      self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)

  @property
  def stderr(self) -> str:
    return self.log.read_text()

  def wait_for(self, condition, timeout=240.0):
    """Polls `condition` until it is true; fails if the process ends or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
      if self.proc.poll() is not None:
        pytest.fail(f"exited {self.proc.returncode}:\n{self.stderr}")
      if time.monotonic() > deadline:
        self.proc.kill()
        pytest.fail(f"timed out:\n{self.stderr}")
      time.sleep(0.002)

  def finish(self, timeout=240.0) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()


@pytest.fixture
def bad_batch(monkeypatch):
  """install(i, ...): training batches i, ... carry out-of-vocabulary targets, as a
  corrupt shard would; the cross entropy's gather reads NaN for them, so those steps'
  losses are NaN."""
  def install(*indices):
    rows = data_lib.Batches.rows

    def corrupted(self, batch, start=0, stop=None):
      inputs, targets = rows(self, batch, start, stop)
      if self.shuffle and batch in indices:
        targets = targets.copy()
        targets[:, -1] = self.vocab_size
      return inputs, targets
    monkeypatch.setattr(data_lib.Batches, "rows", corrupted)
  return install


# ----------------------------------------------------------------------- NaN / Inf

def test_on_nan_skip_keeps_the_state_and_goes_on(tmp_path, cache_dir, bad_batch, capsys):
  """Step 2's batch is corrupt: its update is skipped (params, optimizer state and
  buffers stay those of step 1), it is logged, and steps 3-4 train normally."""
  bad_batch(1)
  cfg = in_process("train.on_nan=skip", "train.keep=4")
  result = run(cfg, tmp_path, stop_after=4, verbose=False)
  err = capsys.readouterr().err
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert [r["nonfinite"] for r in records] == [False, True, False, False]
  assert np.isnan(records[1]["loss"]) and np.isfinite(records[1]["grad_norm"])
  assert all(np.isfinite(r["loss"]) for r in records if r["step"] != 2)
  assert ("warning: step 2: non-finite loss (loss=nan, aux_loss=" in err
          and "skipped the update (train.on_nan=skip)" in err), err
  assert err.count("non-finite") == 1
  # The logged lr is the one optax applies: the skipped step does not advance it.
  assert records[2]["lr"] == records[1]["lr"] and records[3]["lr"] < records[2]["lr"]

  one, two, three = restored(cfg, tmp_path, (1, 2, 3))
  assert int(two.step) == 2  # the batch is consumed: step 3 reads batch 2
  assert not np.array_equal(two.rng, one.rng)
  for kept in ("params", "opt_state", "buffers"):
    for a, b in zip(jax.tree.leaves(getattr(two, kept)), jax.tree.leaves(getattr(one, kept))):
      np.testing.assert_array_equal(a, b)
  # Steps 1 and 3 applied their updates, step 2 did not.
  assert counts(one.opt_state) == counts(two.opt_state) == [1, 1]
  assert counts(three.opt_state) == [2, 2]
  assert not np.array_equal(three.params["embed"]["embedding"][...],
                            two.params["embed"]["embedding"][...])
  assert int(result.state.step) == 4


def test_on_nan_skip_stops_after_nan_skip_limit_in_a_row(tmp_path, cache_dir, bad_batch):
  """Batches 2-4 are corrupt and train.nan_skip_limit=2: steps 3 and 4 are skipped,
  step 5 (the third in a row) stops the run, naming the limit."""
  bad_batch(2, 3, 4)
  cfg = in_process("train.on_nan=skip", "train.nan_skip_limit=2")
  with pytest.raises(NonFiniteError, match=r"step 5: non-finite loss .* \(3 non-finite steps "
                     r"in a row, over train.nan_skip_limit=2\); latest checkpoint: .*/4$"):
    run(cfg, tmp_path, stop_after=6, verbose=False)
  assert [r["nonfinite"] for r in read_metrics(tmp_path)] == [False, False, True, True, True]


def test_on_nan_stop_exits_3_naming_the_step(tmp_path, cache_dir, bad_batch, capsys):
  """The CLI stops at the corrupt step 3 with one line and exit code 3; no checkpoint
  of step 3 is written, so step 2 stays the latest."""
  bad_batch(2)
  code = cli_main("--run-dir", str(tmp_path), "--checkpoint-every", "1", "--on-nan", "stop")
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert code == 3, err
  assert len(errors) == 1 and "Traceback" not in err, err
  assert errors[0].startswith("error: step 3: non-finite loss (loss=nan, aux_loss="), err
  assert errors[0].endswith(f"latest checkpoint: {tmp_path.absolute() / 'checkpoints' / '2'}")
  assert step_dirs(tmp_path) == [1, 2]
  assert [r["nonfinite"] for r in read_metrics(tmp_path)] == [False, False, True]


def test_a_nonfinite_state_is_never_checkpointed(tmp_path):
  state = {"w": np.ones((2, 3), np.float32), "v": np.array([1.0, np.inf], np.float32),
           "count": np.int32(3)}
  checkpointer = Checkpointer(tmp_path, keep=2)
  try:
    with pytest.raises(NonFiniteError, match=r"step 7: the train state holds NaN/Inf in "
                                             r"\['v'\]; not checkpointing it"):
      save_checkpoint(checkpointer, 7, state, {})
  finally:
    checkpointer.close()
  assert step_dirs(tmp_path) == []


def test_on_nan_must_be_skip_or_stop():
  with pytest.raises(ConfigError, match=r"train.on_nan='maybe' is invalid: must be 'skip' or"):
    load_config(TINY, ["train.on_nan=maybe"])


# ---------------------------------------------------------------- damaged checkpoints

def truncate(path: pathlib.Path) -> None:
  os.truncate(path, path.stat().st_size // 2)


def test_damaged_checkpoints_fall_back_to_the_last_good_one(tmp_path, cache_dir, capsys):
  """Damaged newest steps are moved aside with a warning naming each, and the run
  resumes from the newest step that reads back; when none does, the CLI exits 4 naming
  every directory and moves nothing.

  In-process the damage is to metadata: a failed array read leaves Orbax's sibling
  reads pending, and this process would print them at exit. Truncated array data is
  resumed past in a subprocess.
  """
  run_dir = tmp_path / "run"
  cfg = in_process("train.keep=3")
  run(cfg, run_dir, stop_after=3, verbose=False)
  ckpts = run_dir.absolute() / "checkpoints"
  assert step_dirs(run_dir) == [1, 2, 3]
  truncate(ckpts / "3" / "state" / "_METADATA")  # the array index
  (ckpts / "2" / "meta" / "metadata").write_text("{")  # the run record
  capsys.readouterr()

  resumed = run(cfg, run_dir, stop_after=3, verbose=False)
  err = capsys.readouterr().err
  assert resumed.start_step == 1
  assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
  for step in (3, 2):
    assert (f"warning: checkpoint {ckpts / str(step)} is unreadable (JSONDecodeError: "
            in err), err
    assert f"moved it to {step}.corrupt and resumed from the previous good step 1" in err
  assert step_dirs(run_dir) == [2, 3, 4]  # written again by the resumed run; keep=3
  assert (ckpts / "2.corrupt").is_dir() and (ckpts / "3.corrupt").is_dir()

  for f in (ckpts / "4" / "state").glob("ocdbt.process_*/d/*"):
    truncate(f)  # the array data
  cli = Cli(run_dir, cache_dir, "--checkpoint-every", "1", "--keep", "3", "--stop-after", "1")
  assert cli.finish() == 0, cli.stderr
  assert (f"warning: checkpoint {ckpts / '4'} is unreadable (ValueError: OUT_OF_RANGE: "
          in cli.stderr), cli.stderr
  assert "resumed from step 3 " in cli.stderr
  assert step_dirs(run_dir) == [2, 3, 4] and (ckpts / "4.corrupt").is_dir()

  for step in (2, 3, 4):
    truncate(ckpts / str(step) / "state" / "_METADATA")
  code = cli_main("--run-dir", str(run_dir))
  err = capsys.readouterr().err
  (error,) = [line for line in err.splitlines() if line.startswith("error:")]
  assert code == 4, err
  assert error.startswith(f"error: no checkpoint in {ckpts} reads back ({ckpts / '4'}: "), err
  assert all(f"{ckpts / str(s)}: JSONDecodeError: " in error for s in (2, 3, 4)), error
  assert error.endswith("move the damaged directories away to start afresh")
  assert step_dirs(run_dir) == [2, 3, 4]  # left in place


# ------------------------------------------------------------------- kill and signals

def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path, cache_dir):
  """kill -9 while Orbax writes a step (its tmp directory exists): the restart resumes
  from the newest complete step, without a warning, and the run completes. The kill
  is retried (each retry is a restart) until one lands mid-save."""
  run_dir = tmp_path / "run"
  expected_start, mid_save_kills = 0, 0
  for _ in range(3):
    cli = Cli(run_dir, cache_dir, "--checkpoint-every", "1", "--keep", "2")
    # Once this process has compiled, the metrics lines and tmp directories are its own.
    cli.wait_for(lambda: "compiled the train step" in cli.stderr)
    cli.wait_for(lambda: metrics_lines(run_dir) > expected_start + 1
                 and tmp_dirs(run_dir) and step_dirs(run_dir))
    cli.proc.send_signal(signal.SIGKILL)
    assert cli.finish() == -signal.SIGKILL
    assert expected_start == 0 or f"resumed from step {expected_start} " in cli.stderr
    assert "warning: checkpoint" not in cli.stderr, cli.stderr
    expected_start = step_dirs(run_dir)[-1]
    mid_save_kills += bool(tmp_dirs(run_dir))  # the save it was writing never committed
    if mid_save_kills:
      break
  assert mid_save_kills, "no kill landed during a save"

  cli = Cli(run_dir, cache_dir, "--checkpoint-every", "0", "--keep", "2")
  assert cli.finish() == 0, cli.stderr
  assert f"resumed from step {expected_start} " in cli.stderr
  assert "warning: checkpoint" not in cli.stderr, cli.stderr
  assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, STEPS + 1))
  assert step_dirs(run_dir)[-1] == STEPS and tmp_dirs(run_dir) == []


def test_sigterm_then_sigint_checkpoint_the_step_and_exit(tmp_path, cache_dir):
  """SIGTERM, then SIGINT on the resumed run: each finishes its step, saves it
  synchronously (checkpoint_every=0, so only the signal saves) and exits 128+signum;
  the next run resumes from exactly that step, and the last one completes."""
  run_dir = tmp_path / "run"
  saved = 0
  for signum in (signal.SIGTERM, signal.SIGINT):
    cli = Cli(run_dir, cache_dir, "--checkpoint-every", "0")
    cli.wait_for(lambda: metrics_lines(run_dir) >= saved + 2)
    os.kill(cli.proc.pid, signum)
    assert cli.finish() == 128 + signum, cli.stderr
    assert saved == 0 or f"resumed from step {saved} " in cli.stderr
    records = read_metrics(run_dir)
    stopped = records[-1]["step"]
    assert saved + 2 <= stopped < STEPS
    assert [r["step"] for r in records] == list(range(1, stopped + 1))
    assert step_dirs(run_dir)[-1] == stopped and tmp_dirs(run_dir) == []
    name = signal.Signals(signum).name
    assert (f"stopped by {name} after step {stopped}: saved "
            f"{run_dir.absolute() / 'checkpoints' / str(stopped)}") in cli.stderr
    assert f"interrupted by {name}: rerun the same command to resume" in cli.stderr
    saved = stopped

  cli = Cli(run_dir, cache_dir, "--checkpoint-every", "0")
  assert cli.finish() == 0, cli.stderr
  assert f"resumed from step {saved} " in cli.stderr
  assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, STEPS + 1))


# ------------------------------------------------------------------ capacity drops

def _drop_loop(**moe):
  from types import SimpleNamespace
  from models.train_loop import _Loop
  cfg = load_config(TINY, SMALL + [f"moe.{k}={v}" for k, v in moe.items()])
  model = SimpleNamespace(cfg=cfg, moe_layers=[0])
  return _Loop(model, None, None, None, None, None, lead=True, verbose=True)


def test_capacity_drops_warn_with_counts_at_most_every_100_steps(capsys):
  loop = _drop_loop(dropless="false", capacity_factor=1.0)
  pairs = 8 * 16 * 2  # batch x seq x top_k of SMALL on tiny
  for step in (1, 2, 101):
    loop._check_drops({"step": step, "dropped": [pairs // 10]})
  lines = capsys.readouterr().err.splitlines()
  assert [l.split(":")[1] for l in lines] == [" step 1, layer 0", " step 101, layer 0"]
  assert f"capacity dropped {pairs // 10} of {pairs} (token, expert) pairs" in lines[0]
  loop._check_drops({"step": 300, "dropped": [1]})  # below train.drop_warning = 1%
  assert capsys.readouterr().err == ""


def test_a_drop_in_dropless_mode_is_an_error():
  from hiermoe_jax.diagnostics import DroplessViolation
  with pytest.raises(DroplessViolation, match="step 5, layer 0: dropless dispatch dropped 1"):
    _drop_loop(dropless="true")._check_drops({"step": 5, "dropped": [1]})
