"""Orbax checkpoints of the train state: asynchronous, atomic, keep the last K.

A checkpoint holds the whole TrainState (params, optimizer state, router biases,
expert placements, step = data position, train RNG) plus a JSON record (data
position, the config it was written with). Restoring reads into the shardings of
the *current* mesh, so a run saved on 2x4 resumes on 1x8.
"""

from __future__ import annotations

import pathlib
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, run_dir: str | pathlib.Path, *, keep: int):
    directory = pathlib.Path(run_dir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts an asynchronous save; training continues while it is written."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Reads step `step` into the shardings that `abstract_state` carries."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
