"""Host-side `auto`: time the candidate strategies on the run's own routing and mesh,
then fix one strategy per layer, so the step runs it as a plain compiled program.

    times = time_layer(mesh, config, ids_TK)          # {strategy: median ms}
    tuner = AutoTuner(layers=2, candidates=candidates(config, mesh))
    record = tuner.decide(step, [times_layer0, times_layer1], reason="start")
    tuner.choices                                     # ("hier_dedup", "flat_dedup")

The in-graph `auto` (MoEConfig.dispatch="auto" in `moe_apply`) prices strategies by
a cost profile and runs the winner under `lax.switch` on every call; this module
measures instead, and the decision costs nothing inside the step. `AutoTuner` keeps
the choices stable: a strategy replaces the current one only when it is faster by
more than `margin` on `confirm` checks in a row (hysteresis: timing noise does not
flap between programs, each of which costs a compilation).

Multi-process: every sample is the slowest process's time (one allgather), so all
processes hold the same numbers and take the same decisions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from hiermoe_jax.config import MoEConfig
from hiermoe_jax import moe
from hiermoe_jax.dispatch import auto
from hiermoe_jax.errors import check_int, check_real
from hiermoe_jax.mesh import named
from hiermoe_jax.params import init_params, param_specs
from hiermoe_jax.validate import shape_of


def candidates(config: MoEConfig, mesh: Mesh) -> tuple[str, ...]:
  """The strategies `auto` may pick on this mesh (as the in-graph `auto`)."""
  return auto.candidates(shape_of(config, mesh), config.top_k)


# ------------------------------------------------------------------------- timing

def _slowest_process(samples_NR: np.ndarray) -> np.ndarray:
  """Each sample's max over processes: identical on every process."""
  if jax.process_count() == 1:
    return samples_NR
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(samples_NR)).max(axis=0)


def slowest_process_ms(ms: float) -> float:
  """A host wall time made the same on every process (its max), so that a decision
  built on it (e.g. `AutoTuner`'s spacing of checks) agrees everywhere."""
  return float(_slowest_process(np.array([[ms]], np.float64))[0, 0])


def barrier(tag: str) -> None:
  """Every process waits here for the others (a no-op in one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(tag)


def samples_ms(steps: dict[str, Callable[[], object]], *, repeats: int, warmup: int,
               barrier_each: bool = False) -> dict[str, np.ndarray]:
  """ms of every call of each step, [repeats] per step, interleaved: the order
  rotates every repeat, cancelling drift on a shared machine. Each sample is the
  slowest process's, so every process gets the same numbers. barrier_each: the
  processes start every call together (cleaner samples for a benchmark, one more
  round trip per call)."""
  names = list(steps)
  for _ in range(warmup):
    for name in names:
      jax.block_until_ready(steps[name]())
  samples = {name: [] for name in names}
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      if barrier_each:
        barrier(f"hiermoe_jax.calibrate.{r}.{name}")
      t0 = time.perf_counter()
      jax.block_until_ready(steps[name]())
      samples[name].append((time.perf_counter() - t0) * 1e3)
  local = np.array([samples[name] for name in names], np.float64)
  return dict(zip(names, _slowest_process(local)))


def measure(steps: dict[str, Callable[[], object]], *, repeats: int = 5,
            warmup: int = 1) -> dict[str, float]:
  """Median ms per call of each step (`samples_ms`); the same on every process."""
  check_int("repeats", repeats)
  check_int("warmup", warmup, low=0)
  return {name: float(np.median(row))
          for name, row in samples_ms(steps, repeats=repeats, warmup=warmup).items()}


@functools.cache
def layer_step(mesh: Mesh, config: MoEConfig, strategy: str, backward: bool) -> Callable:
  """jit(x, slots, w, experts, ct) running one MoE layer's routed part with `strategy`:
  capacity decision -> dispatch -> local experts -> combine, per device exactly as
  `moe_apply` runs it (`moe.device_step`), and with `backward` the VJP wrt x, w and
  experts."""
  shape = shape_of(config, mesh)

  def device(x_TD, slots_TK, w_TK, experts):
    body = moe.device_step(config, mesh, x_TD.shape[0], dispatch=strategy)
    return body(x_TD, slots_TK, w_TK, experts)[0]

  rows = shape.rows(2)
  forward = jax.shard_map(device, mesh=mesh,
                          in_specs=(rows, rows, rows, param_specs(config)["experts"]),
                          out_specs=rows, check_vma=config.permute_impl != "pallas")

  def step(x_TD, slots_TK, w_TK, experts, ct_TD):
    if not backward:
      return forward(x_TD, slots_TK, w_TK, experts)
    y_TD, pullback = jax.vjp(lambda x, w, e: forward(x, slots_TK, w, e), x_TD, w_TK, experts)
    return y_TD, pullback(ct_TD)
  return jax.jit(step)


@functools.partial(jax.jit, static_argnames=("config", "num_tokens", "sharding"))
def _layer_inputs(key, ids_TK, placement, *, config: MoEConfig, num_tokens: int, sharding):
  """x [T, D] and a cotangent (random, in the compute dtype), slots and equal weights."""
  slot_of = jnp.argsort(placement)
  kx, kc = jax.random.split(key)
  dtype = jnp.dtype(config.dtype)
  x = jax.random.normal(kx, (num_tokens, config.d_model), dtype)
  ct = jax.random.normal(kc, (num_tokens, config.d_model), dtype)
  slots = slot_of[ids_TK].astype(jnp.int32)
  w = jnp.full(ids_TK.shape, 1.0 / config.top_k, jnp.float32)
  return tuple(jax.lax.with_sharding_constraint(a, sharding) for a in (x, slots, w, ct))


def time_layer(mesh: Mesh, config: MoEConfig, ids_TK, *, placement=None,
               names: Sequence[str] | None = None, repeats: int = 5, warmup: int = 1,
               backward: bool = True, seed: int = 0) -> dict[str, float]:
  """{strategy: median ms} of one MoE layer's dispatch -> experts -> combine (and VJP)
  on routing ids_TK [tokens, K] (logical ids, token-sharded in mesh order as
  `MoEAux.topk_ids`, or a host array), at the config's shapes and dtypes; the
  strategies (default: `candidates`) run interleaved on the same inputs. Expert
  weights are freshly initialised: the time does not depend on their values."""
  names = tuple(names) if names is not None else candidates(config, mesh)
  sharding = named(mesh, shape_of(config, mesh).rows(2))
  if not isinstance(ids_TK, jax.Array):  # the same host array on every process
    host = np.asarray(ids_TK, np.int32)
    ids_TK = jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  if placement is None:
    placement = np.arange(config.num_experts, dtype=np.int32)
  key = jax.random.key(seed)
  x, slots, w, ct = _layer_inputs(key, ids_TK, placement, config=config,
                                  num_tokens=ids_TK.shape[0], sharding=sharding)
  experts = init_params(key, config, mesh)["experts"]
  steps = {name: functools.partial(layer_step(mesh, config, name, backward),
                                   x, slots, w, experts, ct) for name in names}
  return measure(steps, repeats=repeats, warmup=warmup)


def uniform_ids(config: MoEConfig, num_tokens: int, seed: int = 0) -> np.ndarray:
  """[tokens, K] distinct expert ids drawn uniformly (an untrained router's routing):
  what a run calibrates on before it has routing of its own. Same on every process."""
  rng = np.random.default_rng(seed)
  scores = rng.random((num_tokens, config.num_experts))
  return np.argsort(scores, axis=1)[:, :config.top_k].astype(np.int32)


# ------------------------------------------------------------------------ deciding

def drift(counts_E, reference_E) -> float:
  """Total variation distance between two expert-load distributions, in [0, 1]."""
  p = np.asarray(counts_E, np.float64)
  q = np.asarray(reference_E, np.float64)
  return 0.5 * float(np.abs(p / max(p.sum(), 1) - q / max(q.sum(), 1)).sum())


def fastest(times: dict[str, float], names: Sequence[str]) -> str:
  """The fastest of `names` (ties: the first listed): deterministic on every process."""
  return min(names, key=lambda n: (times[n], names.index(n)))


@dataclasses.dataclass
class AutoTuner:
  """Per-layer strategy choices with hysteresis, re-check cadence and a drift trigger.

  layers: MoE layers; with `shared` (scanned layers: one program for all) a single
    choice, the one with the least total time over the layers.
  recheck_steps: re-measure every this many steps after a check (0: never).
  margin, confirm: a challenger replaces the current strategy only when it is faster
    by more than `margin` (a fraction of the current time) on `confirm` checks in a
    row; a pending challenger makes the next step a check.
  drift_threshold: re-measure when a layer's expert loads move this far (total
    variation distance, `drift`) from those at the last check.
  budget: the share of the time that checks may take. After a check that took
    `calibration_ms`, neither a re-check nor drift triggers one until
    calibration_ms / (budget * the chosen strategies' summed ms) steps have passed -
    the MoE layers' time stands in for the step's (a lower bound of it, and the same
    number on every process, unlike a wall clock).
  """
  layers: int
  candidates: tuple[str, ...]
  shared: bool = False
  recheck_steps: int = 100
  margin: float = 0.1
  confirm: int = 2
  drift_threshold: float = 0.2
  budget: float = 0.05
  choices: tuple[str, ...] | None = None
  checked_at: int = 0
  min_gap: int = 0  # steps before the next re-check or drift check (from `budget`)
  _pending: dict = dataclasses.field(default_factory=dict)  # unit -> (challenger, wins)
  _loads: list | None = None  # expert counts per layer at the last check
  _requested: str | None = None

  def __post_init__(self):
    check_int("layers", self.layers)
    check_int("recheck_steps", self.recheck_steps, low=0)
    check_int("confirm", self.confirm)
    check_real("margin", self.margin, 0)
    check_real("drift_threshold", self.drift_threshold, 0, strict=True)
    check_real("budget", self.budget, 0, strict=True)
    if not self.candidates:
      raise ValueError("AutoTuner: candidates is empty")
    self.candidates = tuple(self.candidates)

  def due(self, step: int, counts: Sequence | None = None) -> str | None:
    """Why step `step` should measure ("start", "confirm", "recheck", "drift"), or None."""
    if self.choices is None:
      return "start"
    if self._requested:
      return self._requested
    if self._pending:
      return "confirm"
    if step - self.checked_at < self.min_gap:  # checks keep within their budget
      return None
    if self.recheck_steps and step - self.checked_at >= self.recheck_steps:
      return "recheck"
    if counts is not None and self._loads is not None and any(
        drift(c, r) > self.drift_threshold for c, r in zip(counts, self._loads)):
      return "drift"
    return None

  def decide(self, step: int, times: Sequence[dict[str, float]], *, reason: str = "",
             counts: Sequence | None = None, calibration_ms: float | None = None) -> dict:
    """Takes the measured {strategy: ms} of every layer; returns the decision's record
    (JSON-able): the times, the choices after it and the layers that changed."""
    if len(times) != self.layers:
      raise ValueError(f"AutoTuner.decide: {len(times)} layers timed, expected {self.layers}")
    units = ([{n: sum(t[n] for t in times) for n in self.candidates}] if self.shared
             else list(times))
    before = self.choices
    current = ([before[0]] if self.shared else list(before)) if before else [None] * len(units)
    chosen = [self._choose(u, t, c) for u, (t, c) in enumerate(zip(units, current))]
    self.choices = tuple(chosen * self.layers if self.shared else chosen)
    self.checked_at = step
    self._requested = None
    if calibration_ms is not None:
      moe_ms = sum(t[c] for t, c in zip(times, self.choices))
      self.min_gap = math.ceil(calibration_ms / (self.budget * moe_ms)) if moe_ms > 0 else 0
    if counts is not None:
      self._loads = [np.asarray(c) for c in counts]
    return {"step": step, "reason": reason,
            "calibration_ms": calibration_ms,
            "times_ms": [dict(t) for t in times],
            "choices": list(self.choices),
            "changed": [i for i in range(self.layers)
                        if before is not None and before[i] != self.choices[i]],
            "pending": {str(u): c for u, (c, _) in self._pending.items()},
            "shared": self.shared, "next_check_after_steps": self.min_gap}

  def request(self, reason: str) -> None:
    """Makes the next `due` a check, e.g. once the run has routing of its own, or
    after an expert swap moved the traffic."""
    self._requested = reason

  def _choose(self, unit: int, times: dict[str, float], current: str | None) -> str:
    best = fastest(times, self.candidates)
    if current is None:
      return best
    if best == current or times[best] >= (1 - self.margin) * times[current]:
      self._pending.pop(unit, None)
      return current
    challenger, wins = self._pending.get(unit, (best, 0))
    wins = wins + 1 if challenger == best else 1
    if wins >= self.confirm:
      self._pending.pop(unit, None)
      return best
    self._pending[unit] = (best, wins)
    return current
