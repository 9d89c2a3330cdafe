"""When to swap: a host-side controller over `search` and `migrate`.

    controller = SwapController(search_config, mesh, swap_interval=50,
                                expert_path=lambda layer: ("blocks", layer, "ffn"))
    for step in ...:
      state, ids_by_layer = train_step(...)
      for layer, ids in ids_by_layer.items():
        controller.observe(layer, ids)          # cheap: keeps a reference
      tree, placements, events = controller.maybe_swap(done, tree, placements)

Statistics: a sliding window of the last `window` observed routings per layer
(logical expert ids [N*G, T, K], one row of tokens per source device in mesh
order). Ids are logical, so a swap does not invalidate the window: every decision
re-evaluates it under the current placement. The window is exact (no EMA).

Every `swap_interval` steps, each layer with observations gets one `search` on
its window concatenated along T; the layers whose plan changes the placement then
move together in one `migrate_many` - their expert leaves in the parameters AND
the optimizer state, passed together as one `tree` - and their placements are
updated. Every layer whose leaves are in the tree is passed to `migrate_many`
(identity when unchanged), so one compiled program serves every decision.

Measured pricing over the horizon: a swap pays when its predicted saving per step
times `swap_interval` (the steps until the next decision) exceeds its migration
time. The controller times each migration it runs (`jax.block_until_ready`, wall
ms, compilation excluded) and prices the next decisions at `slice_ms`, an
exponential average (weight `ema`) of ms per moved expert slice (one expert's
weights and optimizer state); until the first migration, the cost model prices it
(`SearchConfig.profile`), unless `calibrate` ran: a one-off timed probe at the
start of a run that also compiles the migration program then, not mid-training. In multi-process runs each measurement is the max over
processes, so every process prices - and decides - the same.

Adaptive interval (`max_interval`): plans are priced over max_interval steps (a
placement stays until a later decision changes it) and, after each decision, the
next comes after the taken plans' break-even steps (migration / saving per step;
the soonest one), within [swap_interval, max_interval]; when nothing pays the
interval doubles. With `SearchConfig.group_plans` a decision may re-place whole
groups of experts (`groups.py`) instead of pairs, priced the same way. The
chosen interval, the next decision step and the measured price are host state that
`schedule()` / `restore_schedule()` carry through a checkpoint (the trainer saves
them in the step's JSON record), so a resumed run decides when the uninterrupted
one would.

Scanned stacks (`stacks`): a placement key may hold an [L, E] placement over
[L, E, ...] leaves; each row is searched on its own layer's window, and the
stack migrates in place (one `migrate_many` move with the [L, E] tables).

All or nothing: `maybe_swap` returns either the old tree and placements (no
decision, or nothing pays) or the new tree with every new placement. Everything
that can fail on the host (searches, leaf selection, checks, tracing, compiling)
runs before the one migration program consumes any input, so such a failure
raises `SwapError` with the caller's tree and placements intact and usable (the
controller never mutates them). Only a failure of the running program (a dead
peer, a device error) consumes the donated expert leaves; `SwapError` then says so
and the run must resume from its last checkpoint. A checkpoint taken between calls
therefore never mixes placements and weights.

Multi-process: observed ids may be token-sharded global arrays (e.g.
`MoEAux.topk_ids` straight out of a jitted step). At a decision the controller
turns each into the full host array: a fully addressable array (one process, or
a replicated array) is read directly; otherwise
`jax.experimental.multihost_utils.process_allgather(ids, tiled=True)` gathers
the global array on every process. Every process thus runs `search` on the same
global statistics, and `search` is deterministic, so all processes take the same
decision and compile the same migration. All processes must call `maybe_swap`
at the same steps (they do when they run the same loop).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Hashable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from hiermoe_jax.calibrate import barrier, slowest_process_ms
from hiermoe_jax.mesh import AXES, MeshShape
from hiermoe_jax.swap.migrate import EXPERTS_KEY, migrate_many
from hiermoe_jax.swap.migrate import stats as migration_stats
from hiermoe_jax.swap.search import SearchConfig, SwapPlan, search


class SwapError(RuntimeError):
  """A decided migration failed; the message says whether the tree is intact."""


def _key(entry) -> Any:
  for attr in ("key", "name", "idx"):  # DictKey.key, GetAttrKey.name, SequenceKey.idx
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return None


def experts_under(prefix: tuple, num_experts: int, layers: int | None = None) -> Callable:
  """Predicate for `migrate`: expert leaves whose path contains `prefix` (consecutive
  keys, e.g. ("blocks", 1, "ffn")), then a key "experts", with leading dim E (leading
  dims [layers, E] for a scanned stack).

  Matches the parameters and every optimizer-state copy of them (optax states
  repeat the parameter paths under e.g. `.mu` / `.nu`). An empty prefix selects
  every expert leaf.
  """
  prefix = tuple(prefix)
  lead = (num_experts,) if layers is None else (layers, num_experts)

  def select(path, leaf) -> bool:
    keys = [_key(entry) for entry in path]
    if tuple(getattr(leaf, "shape", ())[:len(lead)]) != lead:
      return False
    for start in range(len(keys) - len(prefix) + 1):
      if tuple(keys[start:start + len(prefix)]) == prefix:
        return EXPERTS_KEY in keys[start + len(prefix):]
    return False
  return select


def host_ids(ids) -> np.ndarray:
  """Global routing ids as a host array on every process (see the module docstring)."""
  if isinstance(ids, jax.Array) and not ids.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(ids, tiled=True))
  return np.asarray(ids)


class SwapController:
  """Decides and applies expert swaps every `swap_interval` steps.

  search_config: cost parameters of a decision (`SearchConfig`).
  mesh: the mesh the experts are sharded over, along `expert_axes` (MoEConfig's).
  swap_interval: steps between decisions (> 0).
  window: observed steps kept per layer (default: swap_interval).
  expert_path(key) -> tuple of keys locating the expert subtree of a placement key
    in the tree given to `maybe_swap` (default: () - every expert leaf, for a single
    layer's params / optimizer state).
  stacks: {key: [layer of each row]} for keys whose placement is [L, E] (a scanned
    stack of layers, leaves [L, E, ...]): row r is searched on layer stacks[key][r]'s
    window, and the stack moves in place, without copying rows out.
  ema: weight of the newest measurement in `slice_ms` (1: the last one only).
  max_interval: None (decide every swap_interval steps) or an int > swap_interval:
    the controller chooses its own interval in [swap_interval, max_interval]
    (`next_interval`).
  search_config.steps_until_next_decision is replaced by the horizon (swap_interval,
  or max_interval when adaptive), window_steps by the steps in the layer's window
  (gains are per step).
  """

  def __init__(self, search_config: SearchConfig, mesh: Mesh, swap_interval: int, *,
               window: int | None = None,
               expert_path: Callable[[Hashable], tuple] | None = None,
               expert_axes=AXES, ema: float = 0.5, max_interval: int | None = None,
               stacks: Mapping[Hashable, tuple] | None = None):
    if isinstance(swap_interval, bool) or not isinstance(swap_interval, int) or swap_interval < 1:
      raise ValueError(f"swap_interval={swap_interval!r} is invalid: must be an int >= 1")
    window = swap_interval if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
      raise ValueError(f"window={window!r} is invalid: must be an int >= 1 (observed steps)")
    if not (isinstance(ema, (int, float)) and 0 < ema <= 1):
      raise ValueError(f"ema={ema!r} is invalid: must be a number in (0, 1]")
    if max_interval is not None and (isinstance(max_interval, bool) or not isinstance(
        max_interval, int) or max_interval < swap_interval):
      raise ValueError(f"max_interval={max_interval!r} is invalid: must be None or an int "
                       f">= swap_interval={swap_interval}")
    self.max_interval = max_interval or swap_interval
    self.adaptive = self.max_interval > swap_interval
    self.config = dataclasses.replace(search_config,
                                      steps_until_next_decision=self.max_interval)
    self.ema = float(ema)
    self.mesh = mesh
    self.shape = MeshShape.of(mesh, expert_axes)
    self.swap_interval = swap_interval
    self.window = window
    self.expert_path = expert_path or (lambda layer: ())
    self.stacks = {key: tuple(layers) for key, layers in (stacks or {}).items()}
    self._windows: dict[Hashable, collections.deque] = {}
    self.decisions = 0  # searches run
    self.swaps = 0  # pairs applied
    self.slice_ms: float | None = search_config.slice_ms  # measured price (None: model)
    self.migrations = []  # per migration run: {"step", "slices", "bytes", "ms", "compile_ms"}
    self.interval = swap_interval  # steps until the next decision (adaptive: chosen)
    self.next_decision = swap_interval
    self.intervals = []  # adaptive: (decision step, interval chosen) per decision

  def observe(self, layer: Hashable, topk_ids) -> None:
    """Adds one step's routing of `layer`: logical ids [N*G*T, K] or [N*G, T, K].

    Keeps a reference only (no device-to-host copy until a decision)."""
    self._windows.setdefault(layer, collections.deque(maxlen=self.window)).append(topk_ids)

  def _steps(self, layer: Hashable) -> list[np.ndarray]:
    """The layer's observed steps as int32 [N*G, T, K] host ids, oldest first."""
    per_step = []
    for ids in self._windows.get(layer, ()):
      ids = host_ids(ids)
      top_k = ids.shape[-1]
      if ids.size % (self.shape.devices * top_k):
        raise ValueError(f"layer {layer!r}: topk_ids of shape {ids.shape} do not split over "
                         f"{self.shape.devices} devices")
      per_step.append(ids.reshape(self.shape.devices, -1, top_k).astype(np.int32))
    return per_step

  def window_ids(self, layer: Hashable) -> np.ndarray | None:
    """The layer's window as int32 [N*G, W*T, K] host ids (None if nothing observed)."""
    per_step = self._steps(layer)
    return np.concatenate(per_step, axis=1) if per_step else None

  def windows(self) -> dict[Hashable, np.ndarray]:
    """Every layer's window as int32 host ids [steps kept, N*G, T, K], for a
    checkpoint (a collective in multi-process runs: call it on every process)."""
    return {layer: np.stack(self._steps(layer))
            for layer, entries in self._windows.items() if entries}

  def restore_windows(self, windows: Mapping[Hashable, np.ndarray]) -> None:
    """Replaces the windows with saved ones (`windows()`), so a resumed run decides
    as the uninterrupted one would; keeps the last `window` steps of each."""
    self._windows = {layer: collections.deque(np.asarray(steps), maxlen=self.window)
                     for layer, steps in windows.items()}

  def schedule(self) -> dict:
    """The decision schedule as JSON: interval, next decision step, slice_ms."""
    return {"interval": int(self.interval), "next_decision": int(self.next_decision),
            "slice_ms": None if self.slice_ms is None else float(self.slice_ms)}

  def restore_schedule(self, saved: Mapping[str, Any]) -> None:
    """Takes back a `schedule()`; the interval is clamped to this controller's
    [swap_interval, max_interval] (the run may resume with other settings)."""
    interval = int(saved["interval"])
    self.interval = min(max(interval, self.swap_interval), self.max_interval)
    self.next_decision = int(saved["next_decision"])
    if saved.get("slice_ms") is not None:
      self.slice_ms = float(saved["slice_ms"])

  def due(self, step: int) -> bool:
    """Whether `maybe_swap(step, ...)` decides (step = optimizer steps done)."""
    if self.adaptive:
      return step > 0 and step >= self.next_decision
    return step > 0 and step % self.swap_interval == 0

  def next_interval(self, taken: list[SwapPlan]) -> int:
    """Steps until the next decision after one that took `taken` (adaptive mode).

    A plan is taken when its saving over max_interval steps covers its migration;
    the next decision comes once the soonest-paying plan has paid for itself (its
    break-even steps), so cheap, large gains are revisited often. When nothing
    pays, the interval doubles. Bounded by [swap_interval, max_interval].
    """
    if taken:
      steps = min(plan.break_even_steps for plan in taken)
      interval = int(np.ceil(steps)) if np.isfinite(steps) else self.max_interval
    else:
      interval = 2 * self.interval
    return int(min(max(interval, self.swap_interval), self.max_interval))

  def _decided(self, step: int, taken: list[SwapPlan]) -> None:
    if self.adaptive:
      self.interval = self.next_interval(taken)
      self.intervals.append((step, self.interval))
    self.next_decision = step + self.interval

  def plan(self, layer: Hashable, placement) -> SwapPlan | None:
    """One search on the layer's window (None if nothing was observed)."""
    ids = self.window_ids(layer)
    if ids is None:
      return None
    self.decisions += 1
    config = dataclasses.replace(self.config, slice_ms=self.slice_ms,
                                 window_steps=len(self._windows[layer]))
    return search(ids, np.asarray(placement), self.shape, config)

  def record_migration(self, ms: float, slices: int) -> float:
    """Folds one timed migration (wall ms, slices moved) into `slice_ms`; the max
    over processes, so all agree. Returns the agreed ms."""
    ms = slowest_process_ms(ms)
    if slices:
      per_slice = ms / slices
      self.slice_ms = per_slice if self.slice_ms is None else (
          self.ema * per_slice + (1 - self.ema) * self.slice_ms)
    return ms

  def calibrate(self, tree, placements: Mapping[Hashable, Any]):
    """A timed probe: in every layer swap the first slot with the last (on the last
    node), compile, then time the swap back, and price decisions at its ms per
    slice. Returns the tree, same values and placements (leaves are donated)."""
    placements = {key: np.asarray(p).astype(np.int32) for key, p in placements.items()}
    swapped = {}
    for key, placement in placements.items():
      swapped[key] = placement.copy()
      swapped[key][..., [0, -1]] = placement[..., [-1, 0]]
    moves = self._moves(tree, placements, swapped)
    tree = migrate_many(tree, moves, self.mesh, expert_axes=self.shape.axes)
    jax.block_until_ready(tree)
    barrier("hiermoe_jax.swap")
    compile_s, t0 = migration_stats.compile_s, time.perf_counter()
    tree = migrate_many(tree, self._moves(tree, swapped, placements), self.mesh,
                        expert_axes=self.shape.axes)
    jax.block_until_ready(tree)
    compile_s = migration_stats.compile_s - compile_s
    slices = sum(2 * (old.shape[0] if old.ndim == 2 else 1) for old, _, _ in moves)
    self.record_migration(1e3 * (time.perf_counter() - t0 - compile_s), slices)
    return tree

  def maybe_swap(self, step: int, tree, placements: Mapping[Hashable, Any]):
    """Every `swap_interval` steps: search each layer and migrate what pays.

    tree: the pytree holding the expert leaves and their optimizer state, e.g.
      (params, opt_state); moved leaves are donated.
    placements: {key: [E] slot -> logical expert, or [L, E] for a key of `stacks`}
      (host or device values).
    Returns (tree, placements as {key: int32 numpy}, events), one event per
    layer whose placement changed: {"layer", "kind" ("pairs" or a group plan's:
    "colocate", "pack"), "slices" (experts that changed device), "pairs" (slot
    pairs; empty for a group plan), "predicted_gain_ms" (per
    step), "predicted_migration_ms" (as priced), "priced_by" ("model" or
    "measured"), "migration_ms" (measured, its share by bytes), "bytes_moved",
    "time_s" (its search plus its share of the migration and any compilation)}.
    Each migration run is also appended to `migrations`. All or nothing (module
    docstring); raises SwapError if the migration fails.
    """
    placements = {key: np.asarray(p).astype(np.int32) for key, p in placements.items()}
    if not self.due(step):
      return tree, placements, []
    changes = []  # (layer, plan, search seconds)
    for key, placement in placements.items():
      for layer, row in self._rows(key, placement):
        t0 = time.perf_counter()
        plan = self.plan(layer, row)
        if plan is not None and plan.changed:
          changes.append((layer, plan, time.perf_counter() - t0))
    self._decided(step, [plan for _, plan, _ in changes])
    if not changes:
      return tree, placements, []
    new_placements = self._applied(placements, {layer: plan for layer, plan, _ in changes})
    moves = self._moves(tree, placements, new_placements)
    barrier("hiermoe_jax.swap")  # peers may still be searching: time the migration only
    compile_s = migration_stats.compile_s
    t0 = time.perf_counter()
    try:
      new_tree = migrate_many(tree, moves, self.mesh, expert_axes=self.shape.axes)
      jax.block_until_ready(new_tree)
    except Exception as e:
      raise _swap_error(step, tree, e) from e
    compile_s = migration_stats.compile_s - compile_s
    slices = sum(plan.slices for _, plan, _ in changes)
    priced = self.slice_ms
    migrate_ms = self.record_migration(
        max(1e3 * (time.perf_counter() - t0 - compile_s), 0.0), slices)
    total_bytes = sum(plan.bytes_to_move for _, plan, _ in changes) or 1
    self.migrations.append({"step": step, "slices": slices, "bytes": total_bytes,
                            "ms": migrate_ms, "compile_ms": 1e3 * compile_s})
    events = []
    for layer, plan, search_s in changes:
      self.swaps += len(plan.pairs)
      share = plan.bytes_to_move / total_bytes
      events.append({"layer": _jsonable(layer), "kind": plan.kind, "slices": plan.slices,
                     "pairs": [list(map(int, p)) for p in plan.pairs],
                     "predicted_gain_ms": float(plan.gain_ms),
                     "predicted_migration_ms": float(plan.migration_ms),
                     "priced_by": "model" if priced is None else "measured",
                     "migration_ms": migrate_ms * share,
                     "bytes_moved": int(plan.bytes_to_move),
                     "time_s": search_s + 1e-3 * migrate_ms * share + compile_s * share})
    return new_tree, new_placements, events

  def _rows(self, key: Hashable, placement: np.ndarray) -> list[tuple[Hashable, np.ndarray]]:
    """(layer, [E] placement) searched for a placement key: itself, or a stack's rows."""
    if placement.ndim == 1:
      return [(key, placement)]
    layers = self.stacks.get(key)
    if layers is None or len(layers) != placement.shape[0]:
      raise ValueError(f"placement {key!r} has shape {placement.shape}; an [L, E] placement "
                       f"needs stacks[{key!r}] to name its L layers (got {layers!r})")
    return list(zip(layers, placement))

  def _applied(self, placements, plans: Mapping[Hashable, SwapPlan]) -> dict:
    """The placements with the planned layers' (or stack rows') new placements."""
    return {key: np.stack([plans[layer].placement.astype(np.int32) if layer in plans else row
                           for layer, row in self._rows(key, placement)]).reshape(placement.shape)
            for key, placement in placements.items()}

  def _moves(self, tree, placements, new_placements) -> list:
    """`migrate_many` moves: every key with expert leaves in `tree` (identity unless
    changed), so the migration program is the same at every decision."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    moves = []
    for key, placement in placements.items():
      layers = placement.shape[0] if placement.ndim == 2 else None
      select = experts_under(self.expert_path(key), placement.shape[-1], layers)
      new = new_placements[key]
      if not any(select(path, leaf) for path, leaf in flat):
        if not np.array_equal(new, placement):
          raise ValueError(f"layer {key!r}: no expert leaf under path "
                           f"{self.expert_path(key)!r} in the tree; check expert_path")
        continue
      moves.append((placement, new, select))
    return moves


def _swap_error(step: int, tree, cause: Exception) -> SwapError:
  what = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}"
  if any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree_util.tree_leaves(tree)):
    return SwapError(f"expert swap at step {step} failed while moving experts ({what}); "
                     "the expert leaves were consumed: resume from the last checkpoint")
  return SwapError(f"expert swap at step {step} failed before any expert moved ({what}); "
                   "params, optimizer state and placements are unchanged")


def _jsonable(layer):
  return int(layer) if isinstance(layer, (int, np.integer)) else str(layer)
