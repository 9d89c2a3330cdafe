"""Step records: metrics.jsonl in the run directory and a console progress bar."""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any, TextIO

import numpy as np

from hiermoe_jax.config import STRATEGIES


def step_record(step: int, metrics, *, step_time_s: float, tokens: int,
                eval_loss: float | None = None, swaps: list[dict] = ()) -> dict[str, Any]:
  """One JSON object for metrics.jsonl; MoE fields are lists with one entry per MoE layer.

  swaps: the expert-swap events of this step (`SwapController.maybe_swap`); step_time_s
  excludes them (a swap's own time is in its event's time_s). nonfinite: the loss, aux
  loss or grad norm was NaN/Inf and the step's update was not applied.
  """
  m = {k: np.asarray(v) for k, v in vars(metrics).items() if k != "topk_ids"}
  record = {
      "step": step,
      "loss": float(m["loss"]),
      "aux_loss": float(m["aux_loss"]),
      "lr": float(m["lr"]),
      "grad_norm": float(m["grad_norm"]),
      "step_time_s": step_time_s,
      "tokens_per_s": tokens / step_time_s if step_time_s > 0 else None,
      "strategy": [STRATEGIES[int(i)] for i in m["strategy_index"]],  # resolves "auto"
      "dedup_rate": [{"node": float(n), "device": float(d)}
                     for n, d in zip(m["dedup_node"], m["dedup_device"])],
      "dropped": [int(d) for d in m["dropped"]],
      "imbalance": [float(x) for x in m["imbalance"]],
      "swaps": list(swaps),
      "nonfinite": not bool(m["finite"]),
  }
  if eval_loss is not None:
    record["eval_loss"] = eval_loss
  return record


class MetricsLog:
  """Appends one JSON line per step; on resume drops lines past the restored step."""

  def __init__(self, run_dir: str | pathlib.Path, *, resume_step: int, enabled: bool = True):
    self.path = pathlib.Path(run_dir) / "metrics.jsonl"
    self.enabled = enabled
    if not enabled:
      return
    kept = []
    if self.path.exists():
      for line in self.path.read_text().splitlines():
        try:
          if json.loads(line)["step"] <= resume_step:
            kept.append(line)
        except (json.JSONDecodeError, KeyError):
          pass  # a line cut short by a kill
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_text("".join(line + "\n" for line in kept))
    self._file = self.path.open("a")

  def write(self, record: dict) -> None:
    if self.enabled:
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()


def read_metrics(run_dir: str | pathlib.Path) -> list[dict]:
  path = pathlib.Path(run_dir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _clock(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
  """`step 120/300 [####......] 40% | 3.2 step/s | loss 2.345 | eta 0:00:56`.

  Redraws one line on a terminal; elsewhere (logs, CI) prints a line every
  `every` steps and at the end.
  """

  def __init__(self, start: int, total: int, *, stream: TextIO = sys.stderr, every: int = 10,
               enabled: bool = True, width: int = 24):
    self.start, self.total, self.stream = start, total, stream
    self.every, self.enabled, self.width = every, enabled, width
    self.tty = stream.isatty()
    self.t0 = None
    self.t0_step = start

  def update(self, step: int, loss: float, eval_loss: float | None = None) -> None:
    if not self.enabled:
      return
    now = time.perf_counter()
    if self.t0 is None:  # rate from the second step on: the first one compiles
      self.t0, self.t0_step = now, step
    done = step - self.t0_step
    rate = done / (now - self.t0) if done > 0 and now > self.t0 else float("nan")
    eta = (self.total - step) / rate if rate == rate and rate > 0 else float("nan")
    filled = int(self.width * step / self.total)
    text = (f"step {step}/{self.total} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{100 * step / self.total:3.0f}% | {rate:.2f} step/s | loss {loss:.4f}"
            + (f" | eval {eval_loss:.4f}" if eval_loss is not None else "")
            + f" | eta {_clock(eta)}")
    if self.tty:
      self.stream.write("\r" + text + ("\n" if step == self.total else ""))
      self.stream.flush()
    elif step % self.every == 0 or step == self.total or eval_loss is not None:
      self.stream.write(text + "\n")
      self.stream.flush()
