"""The training loop: mesh, data, sharded state, resume, steps, eval, checkpoints, metrics.

    result = run(config, run_dir)          # resumes from run_dir's latest checkpoint

The same code runs in one process (any --mesh NxG over its local devices) or in
several (one per node: the mesh's "node" axis is the processes); each process
builds and feeds only its own rows of every global batch.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time

import jax
import numpy as np
import yaml

import hiermoe_jax as hm
from hiermoe_jax import cost as cost_lib
from hiermoe_jax.swap import SearchConfig, SwapController
from models import data as data_lib
from models.checkpoint import Checkpointer
from models.config import Config, ConfigError
from models.metrics import MetricsLog, ProgressBar, step_record
from models.steps import Model, TrainState, placements_of, with_placements


@dataclasses.dataclass
class RunResult:
  state: TrainState
  records: list[dict]  # this invocation's metrics records
  start_step: int  # step the run resumed from (0 for a fresh run)


def build_mesh(cfg: Config) -> jax.sharding.Mesh:
  """("node", "local") mesh; with several processes the node axis is the processes."""
  processes = jax.process_count()
  nodes, local = cfg.mesh.nodes, cfg.mesh.local
  if processes > 1 and nodes not in (None, processes):
    raise ConfigError(f"mesh.nodes={nodes} is invalid: with {processes} processes the node "
                      f"axis is the processes; use mesh.nodes={processes} or leave it unset")
  devices = jax.device_count()
  if nodes is None:
    nodes = processes if local is None else max(devices // local, 1)
  if local is None:
    local = max(devices // nodes, 1)
  if nodes * local != devices:
    raise ConfigError(f"mesh.nodes={nodes} x mesh.local={local} is invalid: their product "
                      f"must equal the {devices} devices (--mesh NxG)")
  return hm.make_mesh(nodes, local)


def validate_for_mesh(cfg: Config, mesh) -> None:
  devices = mesh.devices.size
  if cfg.moe.num_experts % devices:
    raise ConfigError(f"moe.num_experts={cfg.moe.num_experts} is invalid for a "
                      f"{mesh.shape['node']}x{mesh.shape['local']} mesh: it must be a "
                      f"multiple of the device count {devices}")
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

  A decision weighs the predicted saving over the next swap_interval steps against
  the migration of weights and both AdamW moments.
  """
  tc = cfg.train
  if not tc.swap_interval:
    return None
  try:
    profile = cost_lib.load_profile(tc.swap_profile)
  except (OSError, ValueError) as e:
    raise ConfigError(f"train.swap_profile={tc.swap_profile!r} is invalid: {e}") from None
  search_config = SearchConfig(
      profile=profile, d_model=cfg.model.d_model, d_ff=cfg.moe.d_ff,
      bytes_per_elem=np.dtype(cfg.model.dtype).itemsize,
      param_bytes_per_elem=np.dtype(cfg.model.param_dtype).itemsize, optimizer_slots=2,
      steps_until_next_decision=tc.swap_interval, max_pairs=tc.swap_max_pairs,
      migration=tc.swap_migration_cost)
  return SwapController(search_config, model.mesh, tc.swap_interval,
                        window=tc.swap_window or tc.swap_interval,
                        expert_path=lambda layer: ("blocks", layer, "ffn"))


def _swap(model: Model, controller, done: int, state: TrainState, topk_ids) -> tuple:
  """Observes this step's routing; at a decision step migrates experts (params and
  optimizer state together) and writes the new placements into the buffers."""
  for layer, ids in zip(model.moe_layers, topk_ids):
    controller.observe(layer, ids)
  if not controller.due(done):
    return state, []
  placements = placements_of(state.buffers, model.moe_layers)
  (params, opt_state), new, events = controller.maybe_swap(
      done, (state.params, state.opt_state), placements)
  if not events:
    return state, events
  changed = {e["layer"]: new[e["layer"]] for e in events}
  state = state.replace(params=params, opt_state=opt_state,
                        buffers=with_placements(state.buffers, changed))
  return state, events


def _log(message: str, enabled: bool) -> None:
  if enabled:
    print(message, file=sys.stderr, flush=True)


def run(cfg: Config, run_dir: str | pathlib.Path, *, stop_after: int | None = None,
        verbose: bool = True) -> RunResult:
  """Trains to cfg.train.steps, resuming from run_dir's latest checkpoint if any.

  stop_after: return after this many steps of this invocation without a final
    checkpoint, as if the process were killed (tests of resume use it).
  """
  tc = cfg.train
  lead = jax.process_index() == 0
  verbose = verbose and lead
  run_dir = pathlib.Path(run_dir)
  mesh = build_mesh(cfg)
  validate_for_mesh(cfg, mesh)

  train_tokens, eval_tokens = data_lib.split(data_lib.load_tokens(cfg.data),
                                             cfg.data.eval_fraction)
  train_batches = data_lib.Batches(train_tokens, tc.batch_size, tc.seq_len, tc.seed,
                                   vocab_size=cfg.model.vocab_size)
  eval_batches = data_lib.Batches(eval_tokens, tc.batch_size, tc.seq_len, tc.seed,
                                  shuffle=False, vocab_size=cfg.model.vocab_size)

  model = Model(cfg, mesh)
  controller = swap_controller(cfg, model)
  checkpointer = Checkpointer(run_dir, keep=tc.keep)
  start = checkpointer.latest_step()
  if start is None:
    start = 0
    state = model.init_state()
  else:
    state, meta = checkpointer.restore(start, model.abstract_state())
    if meta.get("data_position") != start:
      raise ValueError(f"checkpoint {start} records data_position={meta.get('data_position')}")
    _log(f"resumed from step {start} in {run_dir} on a "
         f"{mesh.shape['node']}x{mesh.shape['local']} mesh", verbose)
  if lead:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

  rows = process_rows(model.batch_sharding, (tc.batch_size, tc.seq_len))
  meta = {"config": cfg.to_dict(), "mesh": dict(mesh.shape)}
  tokens_per_step = tc.batch_size * tc.seq_len
  log = MetricsLog(run_dir, resume_step=start, enabled=lead)
  bar = ProgressBar(start, tc.steps, enabled=verbose)
  records = []
  try:
    if start < tc.steps:
      t0 = time.perf_counter()
      batch = _device_batch(model, train_batches, start, rows)
      step_fn = model.jit_train_step.lower(state, *batch).compile()
      _log(f"compiled the train step in {time.perf_counter() - t0:.1f}s "
           f"(mesh {dict(mesh.shape)}, from step {start})", verbose)
    for step in range(start, tc.steps):
      t0 = time.perf_counter()
      batch = _device_batch(model, train_batches, step, rows)
      state, metrics = step_fn(state, *batch)
      topk_ids, metrics = metrics.topk_ids, metrics.replace(topk_ids=())
      metrics = jax.device_get(metrics)
      step_time = time.perf_counter() - t0
      done = step + 1
      swaps = []
      if controller is not None:
        state, swaps = _swap(model, controller, done, state, topk_ids)
      eval_loss = None
      if tc.eval_every and (done % tc.eval_every == 0 or done == tc.steps):
        eval_loss = evaluate(model, state, eval_batches, rows)
      record = step_record(done, metrics, step_time_s=step_time, tokens=tokens_per_step,
                           eval_loss=eval_loss, swaps=swaps)
      records.append(record)
      log.write(record)
      bar.update(done, record["loss"], eval_loss)
      if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == tc.steps:
        checkpointer.save(done, state, {**meta, "data_position": done})
      if stop_after is not None and done - start >= stop_after:
        break
  finally:
    checkpointer.close()
    log.close()
  return RunResult(state=state, records=records, start_step=start)
