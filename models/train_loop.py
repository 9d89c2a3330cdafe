"""The training loop: mesh, data, sharded state, resume, steps, eval, checkpoints, metrics.

    result = run(config, run_dir)          # resumes from run_dir's latest checkpoint

The same code runs in one process (any --mesh NxG over its local devices) or in
several (one per node: the mesh's "node" axis is the processes); each process
builds and feeds only its own rows of every global batch.

Reliability: a step whose loss or gradients are NaN/Inf never updates the state; with
train.on_nan=skip the run goes on (for up to train.nan_skip_limit such steps in a
row), with "stop" it raises NonFiniteError. SIGTERM and
SIGINT stop the run after the current step with a synchronous checkpoint
(RunResult.interrupted names the signal). A checkpoint is only written from an
all-finite state, and resuming skips damaged checkpoints (models/checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import signal
import sys
import threading
import time
import warnings

import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils

import hiermoe_jax as hm
from hiermoe_jax import cost as cost_lib
from hiermoe_jax import validate
from hiermoe_jax.dispatch import wire
from hiermoe_jax.diagnostics import CapacityWarning, check_drop_counts
from hiermoe_jax.errors import fail
from hiermoe_jax.swap import SearchConfig, SwapController
from models import data as data_lib
from models.checkpoint import CheckpointError, Checkpointer
from models.config import Config, ConfigError, ModelConfig, as_run_keys
from models.metrics import MetricsLog, ProgressBar, step_record
from models.routing_trace import RoutingTrace
from models.steps import (AutoDispatch, Model, TrainState, nonfinite_leaves, placements_of,
                          with_placements)
from models.transformer import block_site


DROP_WARNING_EVERY = 100  # steps between two capacity-drop warnings


class NonFiniteError(RuntimeError):
  """A NaN/Inf loss or gradient with train.on_nan=stop, or a non-finite state to save."""


@dataclasses.dataclass
class RunResult:
  state: TrainState
  records: list[dict]  # this invocation's metrics records
  start_step: int  # step the run resumed from (0 for a fresh run)
  interrupted: int | None = None  # signal number if SIGTERM/SIGINT stopped the run early


def run_mesh(cfg: Config) -> jax.sharding.Mesh:
  """`hm.make_mesh(mesh.nodes, mesh.local)`, its errors naming the run config's keys."""
  try:
    return hm.make_mesh(cfg.mesh.nodes, cfg.mesh.local)
  except ConfigError as e:
    raise as_run_keys(e) from None


def validate_run(cfg: Config, mesh) -> None:
  """The library's checks of cfg.moe on `mesh`, then the trainer's own: with several
  processes the node axis is the processes, and the batch splits over the devices."""
  try:
    validate.validate_for_mesh(cfg.moe, mesh)
  except ConfigError as e:
    raise as_run_keys(e) from None
  processes, nodes = jax.process_count(), cfg.mesh.nodes
  if processes > 1 and nodes not in (None, processes):
    raise ConfigError(f"mesh.nodes={nodes} is invalid: with {processes} processes the node "
                      f"axis is the processes; use mesh.nodes={processes} or leave it unset")
  devices = mesh.devices.size
  if cfg.train.batch_size % devices:
    raise ConfigError(f"train.batch_size={cfg.train.batch_size} is invalid for "
                      f"{devices} devices: it must be a multiple of {devices}")


def process_rows(sharding, shape) -> tuple[int, int]:
  """The contiguous block [start, stop) of batch rows this process's devices hold."""
  index_map = sharding.addressable_devices_indices_map(shape)
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [shape[0] if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  start, stop = min(starts), max(stops)
  rows = sum(b - a for a, b in {(a, b) for a, b in zip(starts, stops)})
  if rows != stop - start:
    raise ValueError(f"this process's batch rows are not contiguous: {sorted(zip(starts, stops))}")
  return start, stop


def _device_batch(model: Model, batches: data_lib.Batches, index: int, rows):
  shape = (batches.batch_size, batches.seq_len)
  inputs, targets = batches.rows(index, *rows)
  return tuple(jax.make_array_from_process_local_data(model.batch_sharding, a, shape)
               for a in (inputs, targets))


def evaluate(model: Model, state: TrainState, batches: data_lib.Batches, rows) -> float:
  losses = [model.jit_eval_step(state, *_device_batch(model, batches, i, rows))
            for i in range(model.cfg.train.eval_batches)]
  return float(np.mean(jax.device_get(losses)))


def swap_controller(cfg: Config, model: Model) -> SwapController | None:
  """The expert-swap controller of train.swap_* (None when train.swap_interval = 0).

  A decision weighs the predicted saving over the next swap_interval steps (or
  swap_max_interval when the controller picks its interval) against the migration
  of weights and both AdamW moments.
  """
  tc = cfg.train
  if not tc.swap_interval:
    return None
  search_config = SearchConfig(
      profile=cost_lib.load_profile(tc.swap_profile),  # TrainConfig checked it loads
      d_model=cfg.model.d_model, d_ff=cfg.moe.d_ff,
      bytes_per_elem=wire.bytes_per_elem(cfg.model.d_model, cfg.model.dtype,
                                         cfg.moe.comm_dtype),  # the dtype on the wire
      param_bytes_per_elem=np.dtype(cfg.model.param_dtype).itemsize, optimizer_slots=2,
      steps_until_next_decision=tc.swap_interval, max_pairs=tc.swap_max_pairs,
      grow_pairs=tc.swap_grow_pairs, group_plans=tc.swap_groups,
      compute_ms_per_pair=tc.swap_compute_ms_per_pair, exact_peaks=tc.swap_exact_peaks,
      migration=tc.swap_migration_cost)
  return SwapController(search_config, model.mesh, tc.swap_interval,
                        window=tc.swap_window or tc.swap_interval,
                        max_interval=tc.swap_max_interval or None,
                        stacks=_stacks(cfg.model, model.moe_layers),
                        expert_path=lambda key: (key,))  # in `_expert_view`'s tree


def _stacks(model_cfg: ModelConfig, layers) -> dict[str, tuple[int, ...]]:
  """{"stacks/<run>": MoE layer of each row} of a scanned model ({} unrolled): the
  controller's keys for [L, E] placements, whose [L, E, ...] leaves move in place."""
  rows = {}
  for layer in layers:
    keys, row = block_site(model_cfg, layer)
    if row is not None:
      rows.setdefault("/".join(map(str, keys)), {})[row] = layer
  for key, by_row in rows.items():
    if sorted(by_row) != list(range(len(by_row))):
      raise ValueError(f"scanned stack {key} mixes MoE and dense rows {sorted(by_row)}")
  return {key: tuple(by_row[r] for r in range(len(by_row))) for key, by_row in rows.items()}


def _key(entry):
  return getattr(entry, "key", getattr(entry, "name", None))


def expert_sites(model_cfg: ModelConfig, layers, tree) -> list[tuple[int, int, int | None]]:
  """(leaf index, MoE layer, row) of the expert leaves of `layers` in `tree` (params,
  optimizer state): a leaf under the layer's block subtree (`block_site`) then a key
  "experts"; row None when the leaf is the layer's own [E, ...] stack, else its row of
  a scanned run's [layers, E, ...] one."""
  subtrees = {}  # keys of a block subtree + ("ffn",) -> [(layer, row)]
  for layer in layers:
    keys, row = block_site(model_cfg, layer)
    subtrees.setdefault(keys + ("ffn",), []).append((layer, row))
  sites = []
  for n, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
    keys = tuple(_key(k) for k in path)
    for prefix, layers in subtrees.items():
      at = next((i for i in range(len(keys)) if keys[i:i + len(prefix)] == prefix), None)
      if at is not None and "experts" in keys[at + len(prefix):]:
        sites += [(n, layer, row) for layer, row in layers]
  return sites


def _expert_view(model: Model, controller: SwapController, state: TrainState) -> tuple:
  """(view, placements, leaves, treedef, sites): the state's own expert leaves as
  {key: {"experts": {leaf index: leaf}}} and their placements {key: [E] or [L, E]},
  key a layer (unrolled) or a scanned stack (`_stacks`; no rows are copied)."""
  leaves, treedef = jax.tree_util.tree_flatten((state.params, state.opt_state))
  sites = expert_sites(model.cfg.model, model.moe_layers, (state.params, state.opt_state))
  key_of = {layer: key for key, layers in controller.stacks.items() for layer in layers}
  view = {}
  for n, layer, _ in sites:
    view.setdefault(key_of.get(layer, layer), {"experts": {}})["experts"][n] = leaves[n]
  per_layer = placements_of(state.buffers, model.moe_layers, model.cfg.model)
  placements = {layer: p for layer, p in per_layer.items() if layer not in key_of}
  placements.update({key: np.stack([np.asarray(per_layer[layer]) for layer in layers])
                     for key, layers in controller.stacks.items()})
  return view, placements, leaves, treedef, sites


def _write_back(state: TrainState, view, leaves, treedef, sites, stacks) -> TrainState:
  """The state with the view's expert leaves (migration donated the old ones)."""
  key_of = {layer: key for key, layers in stacks.items() for layer in layers}
  for n, layer, _ in sites:
    leaves[n] = view[key_of.get(layer, layer)]["experts"][n]
  params, opt_state = jax.tree_util.tree_unflatten(treedef, leaves)
  return state.replace(params=params, opt_state=opt_state)


def calibrate_swaps(model: Model, controller: SwapController, state: TrainState) -> TrainState:
  """`SwapController.calibrate` on the state's expert leaves: compiles the migration
  program and prices a moved slice before step 1 (same values, new leaves)."""
  view, placements, *rest = _expert_view(model, controller, state)
  return _write_back(state, controller.calibrate(view, placements), *rest, controller.stacks)


def _swap(model: Model, controller, done: int, state: TrainState, topk_ids) -> tuple:
  """Observes this step's routing; at a decision step migrates experts (params and
  optimizer state together, `_expert_view`) and writes the new placements into the
  buffers."""
  for layer, ids in zip(model.moe_layers, topk_ids):
    controller.observe(layer, ids)
  if not controller.due(done):
    return state, []
  view, placements, *rest = _expert_view(model, controller, state)
  view, new, events = controller.maybe_swap(done, view, placements)
  if not events:
    return state, events
  state = _write_back(state, view, *rest, controller.stacks)
  per_layer = {layer: p for layer, p in new.items() if layer not in controller.stacks}
  for key, layers in controller.stacks.items():
    per_layer.update(zip(layers, new[key]))
  changed = {e["layer"]: per_layer[e["layer"]] for e in events}
  return state.replace(buffers=with_placements(state.buffers, changed, model.cfg.model)), events


def _log(message: str, enabled: bool) -> None:
  if enabled:
    print(message, file=sys.stderr, flush=True)


class StopSignals:
  """SIGTERM / SIGINT ask the loop to stop after the current step, which it then saves.

  The first signal puts the previous handler back, so a second one acts as usual
  (SIGINT raises KeyboardInterrupt; the Orbax commit protocol keeps the checkpoints
  whole). Handlers can only be installed from the main thread; elsewhere this is inert.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __enter__(self):
    self.received = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = signum
    signal.signal(signum, self._restorable(signum))

  def _restorable(self, signum):
    previous = self._previous[signum]
    return signal.SIG_DFL if previous is None else previous  # None: set outside Python

  def __exit__(self, *exc):
    for signum in self._previous:
      signal.signal(signum, self._restorable(signum))

  def requested(self) -> int | None:
    """The signal to stop on; with several processes a signal to any one stops all,
    at the same step (they must save the same checkpoint)."""
    if jax.process_count() == 1:
      return self.received
    signums = multihost_utils.process_allgather(np.int32(self.received or 0))
    return int(np.max(signums)) or None


def _nonfinite_summary(record: dict) -> str:
  """`loss (loss=nan, aux_loss=0.01, grad_norm=0.3)`: what was NaN/Inf, then all three."""
  names = ("loss", "aux_loss", "grad_norm")
  bad = [n for n in names if not math.isfinite(record[n])]
  return (f"{' and '.join(bad) or 'value'} "
          f"({', '.join(f'{n}={record[n]:.4g}' for n in names)})")


def _on_nonfinite(tc, record: dict, skipped_in_a_row: int, checkpointer: Checkpointer,
                  lead: bool) -> None:
  """The step's update was not applied (steps.py); warn, or raise to stop the run:
  with on_nan=stop, or with skip once more than nan_skip_limit steps in a row failed
  (a run that diverged for good would otherwise go on doing nothing)."""
  what = f"step {record['step']}: non-finite {_nonfinite_summary(record)}"
  limit = tc.nan_skip_limit
  if tc.on_nan == "skip" and (not limit or skipped_in_a_row <= limit):
    _log(f"warning: {what}; skipped the update (train.on_nan=skip)", lead)
    return
  why = ("train.on_nan=stop, --on-nan skip skips such steps" if tc.on_nan == "stop" else
         f"{skipped_in_a_row} non-finite steps in a row, over train.nan_skip_limit={limit}")
  latest = checkpointer.latest_step()
  raise NonFiniteError(
      f"{what}; stopped without applying the update ({why}); latest checkpoint: "
      + (f"{checkpointer.step_dir(latest)}" if latest is not None else "none"))


def save_checkpoint(checkpointer: Checkpointer, step: int, state: TrainState, meta: dict,
                    controller: SwapController | None = None) -> None:
  """Starts the save of `step` (with the swap controller's routing window, if any);
  refuses a state holding NaN/Inf (never checkpointed)."""
  bad = nonfinite_leaves(state)
  if bad:
    latest = checkpointer.latest_step()
    raise NonFiniteError(f"step {step}: the train state holds NaN/Inf in {bad[0]}"
                         + (f" and {len(bad) - 1} more leaves" if len(bad) > 1 else "")
                         + f"; not checkpointing it (latest checkpoint: step {latest})")
  windows, meta = None, {**meta, "data_position": step}
  if controller is not None:
    windows = {f"layer_{layer}": ids for layer, ids in controller.windows().items()}
    meta["swap_schedule"] = controller.schedule()
  checkpointer.save(step, state, meta, swap_windows=windows)


def check_layout(model: Model, checkpointer: Checkpointer) -> None:
  """Refuses to resume checkpoints whose blocks are in the other state layout (stacked
  per run with model.scan_layers, else one subtree per layer): they would not read
  back, and restore_latest would call them damaged. A record without the key predates
  scanning: unrolled."""
  step = checkpointer.latest_step()
  if step is None:
    return
  try:
    saved = checkpointer.read_meta(step)["config"]["model"].get("scan_layers", False)
  except Exception:  # an unreadable step: restore_latest reports and skips it
    return
  if saved != model.cfg.model.scan_layers:
    fail("model.scan_layers", model.cfg.model.scan_layers,
         f"the checkpoints in {checkpointer.directory} hold the other state layout "
         f"(written with model.scan_layers={str(saved).lower()}); resume with "
         f"--set model.scan_layers={str(saved).lower()}")


def _resume(model: Model, checkpointer: Checkpointer, controller: SwapController | None,
            lead: bool) -> tuple[TrainState, int]:
  """The newest checkpoint that reads back (its swap window and decision schedule
  restored into `controller`), or a fresh state at step 0."""
  check_layout(model, checkpointer)

  def check(step, meta):
    if meta.get("data_position") != step:
      raise CheckpointError(f"it records data_position={meta.get('data_position')}")
  found = checkpointer.restore_latest(model.abstract_state(), check=check,
                                      warn=lambda message: _log(message, lead))
  if found is None:
    return model.init_state(), 0
  step, restored = found
  if controller is not None and restored.swap_windows:
    controller.restore_windows({int(key.removeprefix("layer_")): ids
                                for key, ids in restored.swap_windows.items()})
  if controller is not None and restored.meta.get("swap_schedule"):
    controller.restore_schedule(restored.meta["swap_schedule"])
  return restored.state, step


def run(cfg: Config, run_dir: str | pathlib.Path, *, stop_after: int | None = None,
        verbose: bool = True, profile_steps: tuple[int, int] | None = None) -> RunResult:
  """Trains to cfg.train.steps, resuming from run_dir's latest checkpoint if any.

  stop_after: return after this many steps of this invocation without a final
    checkpoint, as if the process were killed (tests of resume use it).
  profile_steps: (A, B): a jax.profiler trace of steps A..B (numbered as in
    metrics.jsonl, inclusive) in run_dir/profile (Perfetto/XProf).
  """
  tc = cfg.train
  lead = jax.process_index() == 0
  verbose = verbose and lead
  run_dir = pathlib.Path(run_dir)
  mesh = run_mesh(cfg)
  validate_run(cfg, mesh)

  # Text is tokenized with the run's tokenizer.json if it has one (scripts/convert_hf.py).
  tokens = data_lib.load_tokens(cfg.data, data_lib.run_tokenizer(run_dir))
  train_tokens, eval_tokens = data_lib.split(tokens, cfg.data.eval_fraction)
  train_batches = data_lib.Batches(train_tokens, tc.batch_size, tc.seq_len, tc.seed,
                                   vocab_size=cfg.model.vocab_size)
  eval_batches = data_lib.Batches(eval_tokens, tc.batch_size, tc.seq_len, tc.seed,
                                  shuffle=False, vocab_size=cfg.model.vocab_size)

  model = Model(cfg, mesh)
  controller = swap_controller(cfg, model)
  checkpointer = Checkpointer(run_dir, keep=tc.keep)
  try:
    state, start = _resume(model, checkpointer, controller, lead)
    if controller is not None and tc.swap_migration_cost:
      state = calibrate_swaps(model, controller, state)  # compiles the migration now
    if start:
      _log(f"resumed from step {start} in {run_dir} on a "
           f"{mesh.shape['node']}x{mesh.shape['local']} mesh", verbose)
    if lead:
      run_dir.mkdir(parents=True, exist_ok=True)
      (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    log = MetricsLog(run_dir, resume_step=start, enabled=lead)
    try:
      with StopSignals() as signals:
        loop = _Loop(model, controller, checkpointer, log, signals,
                     ProgressBar(start, tc.steps, enabled=verbose), lead, verbose,
                     auto=AutoDispatch(model) if model.calibrating else None,
                     profiler=_Profiler(run_dir / "profile", profile_steps),
                     routing_trace=RoutingTrace.of(cfg, model.moe_layers, start))
        with loop.profiler:
          return loop.run(state, start, train_batches, eval_batches, stop_after)
    finally:
      log.close()
  finally:
    checkpointer.close()


@dataclasses.dataclass
class _Profiler:
  """A jax.profiler trace of steps [first, last] (metrics.jsonl numbering) in `directory`,
  one subdirectory per process when there are several."""
  directory: pathlib.Path | None
  steps: tuple[int, int] | None
  running: bool = False

  def before(self, step: int) -> None:
    if self.steps and step == self.steps[0]:
      multi = jax.process_count() > 1
      jax.profiler.start_trace(self.directory / (f"process_{jax.process_index()}" if multi
                                                 else ""), create_perfetto_trace=True)
      self.running = True

  def after(self, step: int) -> None:
    if self.running and step == self.steps[1]:
      self.__exit__()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.running:
      self.running = False
      jax.profiler.stop_trace()


@dataclasses.dataclass
class _Loop:
  """The steps of one invocation of `run`, with what it shares between them."""
  model: Model
  controller: SwapController | None
  checkpointer: Checkpointer
  log: MetricsLog
  signals: StopSignals
  bar: ProgressBar
  lead: bool
  verbose: bool
  auto: AutoDispatch | None = None  # moe.dispatch=auto decided on the host
  profiler: _Profiler = dataclasses.field(default_factory=lambda: _Profiler(None, None))  # off
  last_drop_warning: int | None = None  # step of the last capacity warning
  nonfinite_in_a_row: int = 0
  calibrations: list = dataclasses.field(default_factory=list)  # for the next record
  routing_trace: RoutingTrace | None = None  # train.routing_trace's recorder

  def run(self, state, start, train_batches, eval_batches, stop_after) -> RunResult:
    model, tc = self.model, self.model.cfg.train
    rows = process_rows(model.batch_sharding, (tc.batch_size, tc.seq_len))
    meta = {"config": model.cfg.to_dict(), "mesh": dict(model.mesh.shape)}
    records, interrupted = [], None
    if start < tc.steps:
      t0 = time.perf_counter()
      batch = _device_batch(model, train_batches, start, rows)
      step_fn = self._compile(state, batch, start)
      _log(f"compiled the train step in {time.perf_counter() - t0:.1f}s "
           f"(mesh {dict(model.mesh.shape)}, from step {start})", self.verbose)
    for step in range(start, tc.steps):
      self.profiler.before(step + 1)
      t0 = time.perf_counter()
      batch = _device_batch(model, train_batches, step, rows)
      state, metrics = step_fn(state, *batch)
      topk_ids, metrics = metrics.topk_ids, metrics.replace(topk_ids=())
      metrics = jax.device_get(metrics)
      step_time = time.perf_counter() - t0
      done = step + 1
      self.profiler.after(done)
      swaps = []
      if self.controller is not None and metrics.finite:  # a NaN step's routing is noise
        state, swaps = _swap(model, self.controller, done, state, topk_ids)
      if self.routing_trace is not None and metrics.finite:
        self.routing_trace.observe(done, topk_ids)
      if self.auto is not None and metrics.finite and done < tc.steps:  # a next step to run
        if swaps:  # the placement moved the traffic
          self.auto.tuner.request("swap")
        step_fn = self._recalibrate(done, state, batch, topk_ids, metrics.expert_counts,
                                    step_fn)
      eval_loss = None
      if tc.eval_every and (done % tc.eval_every == 0 or done == tc.steps):
        eval_loss = evaluate(self.auto.current() if self.auto else model, state, eval_batches,
                             rows)
      record = step_record(done, metrics, step_time_s=step_time,
                           tokens=tc.batch_size * tc.seq_len, eval_loss=eval_loss, swaps=swaps)
      if self.calibrations:
        record["auto_calibration"], self.calibrations = self.calibrations, []
      records.append(record)
      self.log.write(record)
      self.bar.update(done, record["loss"], eval_loss)
      self._check_drops(record)
      self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if record["nonfinite"] else 0
      if record["nonfinite"]:
        _on_nonfinite(tc, record, self.nonfinite_in_a_row, self.checkpointer, self.lead)
      interrupted = self._checkpoint(done, state, meta)
      if interrupted or (stop_after is not None and done - start >= stop_after):
        break
    return RunResult(state=state, records=records, start_step=start, interrupted=interrupted)

  def _compile(self, state, batch, start: int):
    """The compiled train step; with the host-side auto, for the choices measured now."""
    if self.auto is None:
      return self.model.jit_train_step.lower(state, *batch).compile()
    return self._recalibrate(start, state, batch, (), None, None)

  def _recalibrate(self, step: int, state, batch, topk_ids, expert_counts, step_fn):
    """A host-side auto check if due: logs its decision, returns the step to run next."""
    record = self.auto.check(step, state, topk_ids, expert_counts)
    if record is None:
      return step_fn
    step_fn = self.auto.train_step(state, batch)
    record["compiled_programs"] = self.auto.compiles
    self.calibrations.append(record)
    _log(f"auto ({record['reason']}, step {step}): {', '.join(record['choices'])} in "
         f"{record['calibration_ms']:.0f} ms, {self.auto.compiles} program(s)", self.verbose)
    return step_fn

  def _check_drops(self, record: dict) -> None:
    """Warns (at most once per DROP_WARNING_EVERY steps) when a layer's capacity drops
    exceed train.drop_warning; a drop in dropless mode raises (a library bug)."""
    cfg = self.model.cfg
    pairs = cfg.train.batch_size * cfg.train.seq_len * cfg.moe.top_k
    quiet = (self.last_drop_warning is not None
             and record["step"] - self.last_drop_warning < DROP_WARNING_EVERY)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", CapacityWarning)
      for layer, dropped in zip(self.model.moe_layers, record["dropped"]):
        check_drop_counts(dropped, pairs, dropless=cfg.moe.dropless,
                          capacity_factor=cfg.moe.capacity_factor,
                          threshold=cfg.train.drop_warning,
                          where=f"step {record['step']}, layer {layer}")
    if caught and not quiet:
      self.last_drop_warning = record["step"]
      for w in caught:
        _log(f"warning: {w.message}", self.lead)

  def _checkpoint(self, done: int, state: TrainState, meta: dict) -> int | None:
    """Saves every checkpoint_every steps, at the end, and on a stop signal; then the
    save completes before returning the signal, for the process to exit."""
    tc = self.model.cfg.train
    interrupted = self.signals.requested()
    if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == tc.steps or (
        interrupted):
      save_checkpoint(self.checkpointer, done, state, meta, self.controller)
      if self.routing_trace is not None:
        self.routing_trace.write()
    if interrupted:
      self.checkpointer.wait()
      _log(f"stopped by {signal.Signals(interrupted).name} after step {done}: saved "
           f"{self.checkpointer.step_dir(done)}", self.lead)
    return interrupted
