"""Records the run's routing for replay (train.routing_trace, hiermoe_jax/traces.py).

The last train.routing_trace_steps steps of every MoE layer's top-k logical ids are
kept in a host ring buffer of steps x MoE layers x global tokens (batch_size *
seq_len) x top_k ids of the smallest unsigned dtype that holds E - 1 (1 byte up to
256 experts): e.g. configs/small.yaml (3 MoE layers, 4096 tokens, K = 8) takes
96 KiB per step, 24 MiB for 256 steps. Every process gathers the global ids (a
collective, as for the swap controller); only process 0 keeps and writes them.

The file is rewritten (atomically) whenever the loop checkpoints: every
train.checkpoint_every steps, at the end and on a stop signal. A resumed run first
reloads the recorded steps up to its start, so its trace continues the old one.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from hiermoe_jax import traces
from hiermoe_jax.swap.controller import host_ids


class RoutingTrace:
  """Ring buffer of the last `capacity` steps' routing ids of `layers`."""

  def __init__(self, path: str, capacity: int, layers, num_experts: int, *, lead: bool):
    self.path, self.capacity, self.layers = path, capacity, tuple(layers)
    self.num_experts, self.lead = num_experts, lead
    self._dtype = traces.id_dtype(num_experts)
    self._ids = None  # [capacity, layers, tokens, K], allocated at the first step
    self._steps = np.zeros(capacity, np.int64)
    self._count = 0  # steps recorded so far (the next row is _count % capacity)

  @classmethod
  def of(cls, cfg, moe_layers, start: int) -> RoutingTrace | None:
    """The recorder of cfg.train.routing_trace (None if unset), resumed at `start`."""
    if not cfg.train.routing_trace:
      return None
    trace = cls(cfg.train.routing_trace, cfg.train.routing_trace_steps, moe_layers,
                cfg.moe.num_experts, lead=jax.process_index() == 0)
    trace.restore(start)
    return trace

  def observe(self, step: int, topk_ids) -> None:
    """Adds step `step`'s ids (one [tokens, K] array per layer, token-sharded)."""
    ids = [host_ids(x) for x in topk_ids]  # a collective: every process calls it
    if self.lead:
      self._append(step, np.stack(ids))

  def _append(self, step: int, ids_LTK: np.ndarray) -> None:
    if self._ids is None or self._ids.shape[1:] != ids_LTK.shape:
      self._ids = np.zeros((self.capacity,) + ids_LTK.shape, self._dtype)
      self._count = 0
    row = self._count % self.capacity
    self._ids[row], self._steps[row] = ids_LTK, step
    self._count += 1

  def _ordered(self) -> np.ndarray:
    """Ring rows oldest first."""
    kept = min(self._count, self.capacity)
    return (np.arange(self._count - kept, self._count) % self.capacity)

  def write(self) -> None:
    """Writes the buffer to `path` (process 0; nothing before the first step)."""
    if not self.lead or not self._count:
      return
    order = self._ordered()
    ids = self._ids[order]
    traces.save(self.path, {layer: ids[:, i] for i, layer in enumerate(self.layers)},
                num_experts=self.num_experts, steps=self._steps[order])

  def restore(self, start: int) -> None:
    """Reloads the steps <= start of an existing trace of this run's layers."""
    if not self.lead or not start or not os.path.isfile(self.path):
      return
    with np.load(self.path) as data:
      names = [f"{traces.LAYER_PREFIX}{layer}" for layer in self.layers]
      if not all(n in data.files for n in names) or "steps" not in data.files:
        return
      keep = data["steps"] <= start
      stacked = np.stack([data[n][keep] for n in names], axis=1)
      steps = data["steps"][keep]
    for step, ids_LTK in zip(steps[-self.capacity:], stacked[-self.capacity:]):
      self._append(int(step), ids_LTK)
