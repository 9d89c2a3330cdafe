"""Orbax checkpoints of the train state: asynchronous, atomic, keep the last K.

A checkpoint holds the whole TrainState (params, optimizer state, router biases,
expert placements, step = data position, train RNG), a JSON record (data
position, the config it was written with) and, with expert swaps on, the swap
controller's routing window (so a resumed run decides as an uninterrupted one).
Restoring reads into the shardings of the *current* mesh, so a run saved on 2x4
resumes on 1x8.

Crash safety: Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it
to `<step>` once complete, so a process killed mid-save leaves the previous steps
intact (the stale tmp directory is removed when the next run opens the manager). A
step that no longer reads back (truncated or corrupt files) is moved aside by
`restore_latest`, which then resumes from the step before it.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class CheckpointError(RuntimeError):
  """No checkpoint of the run reads back; the message names each directory."""


class Restored(NamedTuple):
  state: Any
  meta: dict
  swap_windows: dict | None  # {item key: int32 host ids}; None if not saved


class Checkpointer:
  def __init__(self, run_dir: str | pathlib.Path, *, keep: int):
    self.directory = pathlib.Path(run_dir).absolute() / "checkpoints"
    # cleanup_tmp_directories: a tmp directory at start-up is a save cut short by a kill.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_dir(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def save(self, step: int, state: Any, meta: dict, swap_windows: dict | None = None) -> None:
    """Starts an asynchronous save; training continues while it is written.

    swap_windows: {string key: host array}, identical on every process."""
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if swap_windows:
      items["swap_windows"] = ocp.args.StandardSave(swap_windows)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def read_meta(self, step: int) -> dict:
    """Step `step`'s JSON record alone (the state is not read)."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
        "meta"]

  def restore(self, step: int, abstract_state: Any) -> Restored:
    """Reads step `step` into the shardings that `abstract_state` carries."""
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    saved_windows = (self.step_dir(step) / "swap_windows").exists()
    if saved_windows:
      items["swap_windows"] = ocp.args.StandardRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    windows = ({k: np.asarray(v) for k, v in restored["swap_windows"].items()}
               if saved_windows else None)
    return Restored(restored["state"], restored["meta"], windows)

  def restore_latest(self, abstract_state: Any, *, check: Callable[[int, dict], None],
                     warn: Callable[[str], None]) -> tuple[int, Restored] | None:
    """(step, what it holds) of the newest step that reads back; None without checkpoints.

    check(step, meta) raises if the record does not fit the step. Newer steps that fail
    to read are moved aside to `<step>.corrupt` (kept for inspection, out of
    Orbax's way) with a warning naming them. If no step reads back, nothing is moved:
    CheckpointError names every directory, since starting afresh would drop the run.
    """
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:  # Orbax and TensorStore raise many types for a damaged file
        restored = self.restore(step, abstract_state)
        check(step, restored.meta)
      except Exception as e:
        failures.append((self.step_dir(step), e))
        continue
      for path, error in failures:
        moved = self._move_aside(path)
        warn(f"warning: checkpoint {path} is unreadable ({_one_line(error)}); moved it to "
             f"{moved.name} and resumed from the previous good step {step}")
      if failures:
        self.manager.reload()
      return step, restored
    if failures:
      listing = "; ".join(f"{path}: {_one_line(error)}" for path, error in failures)
      raise CheckpointError(f"no checkpoint in {self.directory} reads back ({listing}); "
                            "move the damaged directories away to start afresh")
    return None

  def _move_aside(self, path: pathlib.Path) -> pathlib.Path:
    target, n = path.with_name(f"{path.name}.corrupt"), 0
    while target.exists():
      n += 1
      target = path.with_name(f"{path.name}.corrupt-{n}")
    if jax.process_index() == 0:
      path.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint: moved {path.name} aside")
    return target

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _one_line(error: Exception, limit: int = 300) -> str:
  """The root cause of `error` on one line (Orbax wraps TensorStore's precise message)."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = " ".join(str(error).split()) or "no message"
  text = f"{type(error).__name__}: {text}"
  return text if len(text) <= limit else text[:limit - 3] + "..."
