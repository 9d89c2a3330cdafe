"""The train state, its shardings, sharded initialisation and the jitted steps.

The model lives as NNX state split three ways: `params` (nnx.Param, trained by
AdamW), `buffers` (router biases and expert placements: state, not trained) and a
static graphdef. Steps are pure functions of (TrainState, batch).

Sharded initialisation never materialises an unsharded copy: eval_shape gives the
abstract state, its PartitionSpecs give the shardings, and jit with those
out_shardings builds each shard on its own device.

Memory at scale:
- model.dense_sharding: the dense (non-expert) parameters and their AdamW moments are
  split over the devices (`dense_shardings`); XLA all-gathers each weight where it is
  used and reduce-scatters its gradient. Expert stacks keep their expert-parallel split.
- train.loss_chunk: the loss unembeds a chunk of positions at a time (models/loss.py).
- train.microbatches: the global batch is split and the gradients accumulated in a
  lax.scan; the router-bias update and the swap statistics see every microbatch's
  routing, so a dropless step equals the full-batch one.
"""

from __future__ import annotations

import copy
import functools
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hiermoe_jax import calibrate
from hiermoe_jax import mesh as mesh_lib
from hiermoe_jax.errors import fail
from models import loss as loss_lib
from models.config import Config, ModelConfig
from models.optimizer import applied_updates, learning_rate, make_optimizer
from models.transformer import Transformer, block_site, is_stacked, layer_state, moe_aux_by_layer


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], optimizer steps taken = batches consumed
  params: Any  # nnx.State of nnx.Param
  opt_state: Any
  buffers: Any  # nnx.State of RouterBias / ExpertPlacement
  rng: jax.Array  # uint32 key data of the train RNG, split every step


@flax.struct.dataclass
class StepMetrics:
  """Per-step scalars, and per-MoE-layer vectors [L]."""
  loss: jax.Array  # LM cross entropy
  aux_loss: jax.Array
  grad_norm: jax.Array  # before clipping
  lr: jax.Array
  dedup_node: jax.Array
  dedup_device: jax.Array
  dropped: jax.Array
  imbalance: jax.Array
  strategy_index: jax.Array  # per MoE layer: index into hm.config.STRATEGIES of what ran
  expert_counts: jax.Array  # [L, E] (token, expert) pairs per logical expert, per MoE layer
  finite: jax.Array  # bool []: loss, aux loss and grad norm finite; else the update was skipped
  # Per MoE layer: routing ids [tokens, K] (token-sharded) for the swap controller,
  # the host-side auto and train.routing_trace; () unless one is on, so that the ids
  # stay off the hot path.
  topk_ids: tuple = ()


@flax.struct.dataclass
class MoEStats:
  """What a step reads of each MoE layer's aux (tuples, one entry per MoE layer), summed
  over microbatches: counts and drops add up, dedup rates are averaged at the end."""
  expert_counts: tuple  # int32 [E] each
  dropped: tuple  # int32
  dedup_node: tuple  # float32
  dedup_device: tuple  # float32
  strategy_index: tuple  # int32; the last microbatch's

  @classmethod
  def of(cls, auxes) -> MoEStats:
    field = lambda get, dtype: tuple(get(a).astype(dtype) for a in auxes)
    return cls(expert_counts=field(lambda a: a.expert_counts, jnp.int32),
               dropped=field(lambda a: a.dropped, jnp.int32),
               dedup_node=field(lambda a: a.dedup_rate["node"], jnp.float32),
               dedup_device=field(lambda a: a.dedup_rate["device"], jnp.float32),
               strategy_index=field(lambda a: a.strategy_index, jnp.int32))

  @classmethod
  def zeros(cls, layers: int, num_experts: int) -> MoEStats:
    scalar = lambda dtype: (jnp.zeros((), dtype),) * layers
    return cls(expert_counts=(jnp.zeros((num_experts,), jnp.int32),) * layers,
               dropped=scalar(jnp.int32), dedup_node=scalar(jnp.float32),
               dedup_device=scalar(jnp.float32), strategy_index=scalar(jnp.int32))

  def add(self, other: MoEStats) -> MoEStats:
    add = lambda a, b: tuple(x + y for x, y in zip(a, b))
    return MoEStats(expert_counts=add(self.expert_counts, other.expert_counts),
                    dropped=add(self.dropped, other.dropped),
                    dedup_node=add(self.dedup_node, other.dedup_node),
                    dedup_device=add(self.dedup_device, other.dedup_device),
                    strategy_index=other.strategy_index)


class Model:
  """Static pieces shared by the steps: config, mesh, graphdef, optimizer."""

  def __init__(self, cfg: Config, mesh: Mesh):
    self.cfg, self.mesh = cfg, mesh
    self.tx = make_optimizer(cfg.train)
    self.schedule = learning_rate(cfg.train)
    self.graphdef, abstract = nnx.get_abstract_model(self._new_model, mesh)
    self._abstract = abstract
    self.moe_layers = nnx.merge(self.graphdef, abstract).moe_layers  # Transformer's
    abs_params, abs_buffers = nnx.split_state(abstract, nnx.Param, ...)
    replicated = NamedSharding(mesh, mesh_lib.replicated())
    self.param_shardings = param_sh = dense_shardings(abs_params, mesh,
                                                       cfg.model.dense_sharding)
    opt_sh = optax.tree_map_params(
        self.tx, lambda _, s: s, jax.eval_shape(self.tx.init, abs_params), param_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    self.state_shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                                      buffers=_shardings(abs_buffers), rng=replicated)
    self.batch_sharding = NamedSharding(mesh, mesh_lib.sharded_rows(2))
    rows, micro = cfg.train.batch_size // mesh.devices.size, cfg.train.microbatches
    if cfg.train.batch_size % mesh.devices.size == 0 and rows % micro:
      fail("train.microbatches", micro, f"must divide the {rows} rows per device "
           f"(train.batch_size={cfg.train.batch_size} over {mesh.devices.size} devices)")

  @property
  def calibrating(self) -> bool:
    """moe.dispatch=auto decided on the host (`AutoDispatch`), not in the graph."""
    return self.cfg.moe.dispatch == "auto" and self.cfg.train.auto_calibrate

  def with_dispatch(self, strategies: tuple[str, ...]) -> Model:
    """This model with each MoE layer's strategy fixed (`Transformer.set_dispatch`): the
    same state, another graph, its own jitted steps."""
    model = nnx.merge(self.graphdef, self._abstract)
    model.set_dispatch(strategies)
    variant = copy.copy(self)
    variant.graphdef = nnx.split(model)[0]
    for name in ("jit_train_step", "jit_eval_step"):  # cached_property: one per graph
      variant.__dict__.pop(name, None)
    return variant

  def _new_model(self) -> Transformer:
    return Transformer(self.cfg.model, self.cfg.moe, mesh=self.mesh,
                       rngs=nnx.Rngs(self.cfg.train.seed))

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs with this mesh's shardings: the restore target."""
    shapes = jax.eval_shape(self._init_state)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, self.state_shardings)

  def _init_state(self) -> TrainState:
    model = self._new_model()
    _, params, buffers = nnx.split(model, nnx.Param, ...)
    key = jax.random.key_data(jax.random.fold_in(jax.random.key(self.cfg.train.seed), 1))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), buffers=buffers, rng=key)

  def init_state(self) -> TrainState:
    with jax.set_mesh(self.mesh):
      return jax.jit(self._init_state, out_shardings=self.state_shardings)()

  # ------------------------------------------------------------------ steps

  def _loss(self, params, buffers, inputs_BS, targets_BS):
    """(CE + aux loss, (CE, aux loss, MoEStats, routing ids per layer or ())) of a batch."""
    model = nnx.merge(self.graphdef, params, buffers)
    hidden_BSD, intermediates = nnx.capture(model.hidden, nnx.Intermediate)(inputs_BS)
    auxes = moe_aux_by_layer(intermediates)
    ce = loss_lib.cross_entropy(hidden_BSD, targets_BS, model.logits_of,
                                self.cfg.train.loss_chunk)
    aux_loss = sum((a.aux_loss for a in auxes), jnp.float32(0))
    wants_ids = (self.cfg.train.swap_interval or self.calibrating
                 or self.cfg.train.routing_trace)
    topk_ids = tuple(a.topk_ids for a in auxes) if wants_ids else ()
    return ce + aux_loss, (ce, aux_loss, MoEStats.of(auxes), topk_ids)

  def _gradients(self, params, buffers, inputs_BS, targets_BS):
    """(CE, aux loss, float32 grads, MoEStats, routing ids) of the global batch, over
    train.microbatches slices of it: losses and grads are the microbatches' means."""
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    micro = self.cfg.train.microbatches
    if micro == 1:
      (_, (ce, aux_loss, stats, topk_ids)), grads = grad_fn(params, buffers, inputs_BS,
                                                            targets_BS)
      return ce, aux_loss, self._constrain_grads(grads), stats, topk_ids

    def body(acc, batch):
      (_, (ce, aux_loss, stats, topk_ids)), grads = grad_fn(params, buffers, *batch)
      grads = self._constrain_grads(jax.tree.map(
          lambda a, g: a + g.astype(jnp.float32), acc[0], grads))
      return (grads, acc[1] + ce, acc[2] + aux_loss, acc[3].add(stats)), topk_ids

    zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
             jnp.float32(0), jnp.float32(0),
             MoEStats.zeros(len(self.moe_layers), self.cfg.moe.num_experts))
    (grads, ce, aux_loss, stats), topk_ids = jax.lax.scan(
        body, (self._constrain_grads(zeros[0]), *zeros[1:]),
        (self._microbatches(inputs_BS), self._microbatches(targets_BS)))
    grads = jax.tree.map(lambda g: g / micro, grads)
    stats = stats.replace(dedup_node=tuple(x / micro for x in stats.dedup_node),
                          dedup_device=tuple(x / micro for x in stats.dedup_device))
    topk_ids = tuple(self._merge_microbatch_rows(ids) for ids in topk_ids)
    return ce / micro, aux_loss / micro, grads, stats, topk_ids

  def _constrain_grads(self, grads):
    """Gradients in the parameters' layout: with sharded dense weights XLA reduce-scatters
    them (and a microbatch accumulator stays sharded)."""
    return jax.lax.with_sharding_constraint(grads, self.param_shardings)

  def _microbatches(self, x_BS):
    """[B, S] -> [M, B / M, S]: microbatch m holds global rows i * M + m, so each device
    keeps its own rows (a reshape and transpose, no communication)."""
    micro = self.cfg.train.microbatches
    b, s = x_BS.shape
    x_MBS = x_BS.reshape(b // micro, micro, s).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(
        x_MBS, NamedSharding(self.mesh, P(None, *self.batch_sharding.spec)))

  def _merge_microbatch_rows(self, ids_MTK):
    """Per-microbatch routing ids [M, B / M * S, K] -> [B * S, K] in the global batch's
    token order (what the swap controller reads of a full-batch step)."""
    micro, tokens, k = ids_MTK.shape
    devices = self.mesh.devices.size
    rows = self.cfg.train.batch_size // (micro * devices)  # per device and microbatch
    seq = tokens // (rows * devices)
    ids = ids_MTK.reshape(micro, devices, rows, seq, k).transpose(1, 2, 0, 3, 4)
    return ids.reshape(micro * tokens, k)

  def train_step(self, state: TrainState, inputs_BS, targets_BS):
    ce, aux_loss, grads, stats, topk_ids = self._gradients(state.params, state.buffers,
                                                           inputs_BS, targets_BS)
    grad_norm = optax.tree.norm(grads)
    # A NaN or Inf in any gradient makes the norm non-finite: three scalars cover the step.
    finite = jnp.isfinite(ce) & jnp.isfinite(aux_loss) & jnp.isfinite(grad_norm)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    buffers = self._update_router_biases(params, state.buffers, stats.expert_counts)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    devices = self.mesh.devices.size
    placements = placements_of(state.buffers, self.moe_layers, self.cfg.model).values()
    metrics = StepMetrics(
        loss=ce, aux_loss=aux_loss, grad_norm=grad_norm,
        lr=self.schedule(applied_updates(state.opt_state)),  # the lr this update uses
        dedup_node=_stack(stats.dedup_node),
        dedup_device=_stack(stats.dedup_device),
        dropped=_stack(stats.dropped),
        imbalance=_stack([imbalance(c, p, devices)
                          for c, p in zip(stats.expert_counts, placements)]),
        strategy_index=_stack(stats.strategy_index),
        expert_counts=_stack(stats.expert_counts),
        finite=finite,
        topk_ids=topk_ids)
    # A non-finite step consumes its batch (step and rng advance) but keeps the old
    # params, optimizer state and buffers: a select, so the donated state stays valid.
    kept = _select(finite, (params, opt_state, buffers),
                   (state.params, state.opt_state, state.buffers))
    new_state = TrainState(step=state.step + 1, params=kept[0], opt_state=kept[1],
                           buffers=kept[2], rng=rng)
    return new_state, metrics

  def eval_step(self, state: TrainState, inputs_BS, targets_BS):
    """Mean CE of the batch, over train.microbatches slices as the train step splits it."""
    def ce(batch):
      return self._loss(state.params, state.buffers, *batch)[1][0]
    if self.cfg.train.microbatches == 1:
      return ce((inputs_BS, targets_BS))
    return jax.lax.map(ce, (self._microbatches(inputs_BS),
                            self._microbatches(targets_BS))).mean()

  def _update_router_biases(self, params, buffers, expert_counts):
    """DeepSeek's aux-loss-free bias update with this step's expert counts (every
    microbatch's)."""
    model = nnx.merge(self.graphdef, params, buffers)
    model.update_router_biases(expert_counts)
    return nnx.state(model, nnx.Not(nnx.Param))

  @functools.cached_property
  def jit_train_step(self):
    return jax.jit(self.train_step, donate_argnums=0,
                   out_shardings=(self.state_shardings, None))

  @functools.cached_property
  def jit_eval_step(self):
    return jax.jit(self.eval_step)


class AutoDispatch:
  """moe.dispatch=auto decided on the host (train.auto_calibrate): times the candidate
  strategies on the run's own routing and mesh (`hiermoe_jax.calibrate`), fixes one per
  MoE layer - one for all scanned layers, the least total - and runs the train step
  compiled for those choices, without lax.switch. One program per distinct choice
  tuple, cached; every process reaches the same choices (calibrate.measure)."""

  REPEATS = 5  # interleaved timed calls per candidate and layer (the median counts)

  def __init__(self, model: Model):
    tc = model.cfg.train
    self.model = model
    self.tuner = calibrate.AutoTuner(
        len(model.moe_layers), calibrate.candidates(model.cfg.moe, model.mesh),
        shared=model.cfg.model.scan_layers, recheck_steps=tc.auto_recheck_steps,
        margin=tc.auto_margin, drift_threshold=tc.auto_drift, budget=tc.auto_budget)
    self._programs = {}  # choices -> (Model with those strategies, compiled train step)

  @property
  def compiles(self) -> int:
    """Train steps compiled so far: one per distinct choice tuple."""
    return len(self._programs)

  def current(self) -> Model:
    """The model with the current choices (for eval), if its step is compiled."""
    return self._programs[self.tuner.choices][0]

  def train_step(self, state: TrainState, batch) -> Any:
    """The compiled train step of the current choices (compiled on first use)."""
    choices = self.tuner.choices
    if choices not in self._programs:
      variant = self.model.with_dispatch(choices)
      self._programs[choices] = (variant, variant.jit_train_step.lower(state, *batch).compile())
    return self._programs[choices][1]

  def check(self, step: int, state: TrainState, topk_ids=(), expert_counts=None) -> dict | None:
    """Measures and decides if due (`AutoTuner.due`); returns the decision record.
    Before the first step (no topk_ids) it times an untrained router's uniform routing
    and asks for a check on the run's own routing after the next step."""
    if len(self.tuner.candidates) == 1:  # one node (or device per node): nothing to time
      return None if self.tuner.choices else self._only_candidate(step)
    counts = None if expert_counts is None else np.asarray(expert_counts)
    reason = self.tuner.due(step, counts)
    if reason is None:
      return None
    t0 = time.perf_counter()
    times = self._measure(state, topk_ids)
    record = self.tuner.decide(step, times, reason=reason, counts=counts,
                               calibration_ms=calibrate.slowest_process_ms(
                                   (time.perf_counter() - t0) * 1e3))
    if not topk_ids:
      self.tuner.request("routing")
    return record

  def _only_candidate(self, step: int) -> dict:
    self.tuner.choices = self.tuner.candidates * self.tuner.layers
    return {"step": step, "reason": "one candidate", "calibration_ms": 0.0, "times_ms": [],
            "choices": list(self.tuner.choices), "changed": [], "pending": {},
            "shared": self.tuner.shared}

  def _measure(self, state: TrainState, topk_ids) -> list[dict[str, float]]:
    cfg, mesh = self.model.cfg, self.model.mesh
    placements = placements_of(state.buffers, self.model.moe_layers, cfg.model).values()
    time_layer = functools.partial(calibrate.time_layer, mesh, cfg.moe, repeats=self.REPEATS,
                                   seed=cfg.train.seed)
    if not topk_ids:  # the same routing for every layer: time it once
      tokens = cfg.train.batch_size * cfg.train.seq_len // cfg.train.microbatches
      times = time_layer(calibrate.uniform_ids(cfg.moe, tokens, cfg.train.seed))
      return [times] * len(self.model.moe_layers)
    return [time_layer(self._first_microbatch(ids), placement=placement)
            for ids, placement in zip(topk_ids, placements)]

  def _first_microbatch(self, ids_TK):
    """A step's routing ids [B * S, K] -> those of one microbatch, the tokens one MoE call
    sees (global rows i * M, `_microbatches`), in its token order."""
    tc = self.model.cfg.train
    ids_BSK = ids_TK.reshape(tc.batch_size, tc.seq_len, -1)
    return ids_BSK[::tc.microbatches].reshape(-1, ids_TK.shape[-1])


def placements_of(buffers, layers, model_cfg: ModelConfig) -> dict[int, jax.Array]:
  """{block index: [E] placement} of the MoE layers (scanned or not: `block_site`)."""
  return {layer: layer_state(buffers, model_cfg, layer)["ffn"]["placement"][...]
          for layer in layers}


def with_placements(buffers, placements: dict, model_cfg: ModelConfig):
  """`buffers` with the given layers' placements replaced (host values, put with the old
  leaf's sharding on every process). A scanned run's [layers, E] leaf keeps the rows of
  the layers not given (placements are replicated: every process reads them)."""
  sites = {}  # keys of a block's subtree -> {row (None: unrolled): [E] placement}
  for layer, value in placements.items():
    keys, row = block_site(model_cfg, layer)
    sites.setdefault(keys, {})[row] = value

  def replace(path, leaf):
    keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
    rows = sites.get(keys[:2])
    if rows is None or keys[2:4] != ("ffn", "placement"):
      return leaf
    if None in rows:
      value = np.asarray(rows[None], leaf.dtype)
    else:
      value = np.array(leaf)
      for row, placement in rows.items():
        value[row] = placement
    return jax.make_array_from_callback(value.shape, leaf.sharding, lambda idx: value[idx])
  return jax.tree_util.tree_map_with_path(replace, buffers)


def nonfinite_leaves(tree) -> list[str]:
  """Paths of the floating-point leaves of `tree` that hold a NaN or an Inf."""
  flat = [(jax.tree_util.keystr(path), x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if jnp.issubdtype(x.dtype, jnp.inexact)]
  finite = jax.device_get(_finite_per_leaf([x for _, x in flat])) if flat else []
  return [path for (path, _), ok in zip(flat, finite) if not ok]


@jax.jit
def _finite_per_leaf(leaves):
  return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def imbalance(counts_E, placement_E, devices: int):
  """max / mean of (token, expert) rows per device, experts in physical order."""
  per_device = counts_E[placement_E].reshape(devices, -1).sum(axis=-1).astype(jnp.float32)
  return jnp.max(per_device) / jnp.maximum(jnp.mean(per_device), 1e-9)


def _select(pred, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _stack(values):
  return jnp.stack(values) if values else jnp.zeros((0,), jnp.float32)


def _shardings(abstract_state):
  return jax.tree.map(lambda a: a.sharding, abstract_state)


# Mesh axes model.dense_sharding splits the dense parameters over.
DENSE_AXES = {"replicated": (), "fsdp": mesh_lib.AXES, "hsdp": (mesh_lib.LOCAL,)}


def dense_spec(shape: tuple[int, ...], axes: tuple[str, ...], size: int) -> P:
  """`axes` (`size` devices) on the largest dim of `shape` they divide (the first of
  equals); replicated for vectors (norm scales: too small to be worth a collective) and
  for matrices no dim of which they divide."""
  dims = [i for i, n in enumerate(shape) if n % size == 0]
  if size == 1 or len(shape) < 2 or not dims:
    return P()
  dim = max(dims, key=lambda i: (shape[i], -i))
  return P(*[(axes if len(axes) > 1 else axes[0]) if i == dim else None
             for i in range(len(shape))])


def dense_shardings(abstract_params, mesh: Mesh, mode: str):
  """The parameters' NamedShardings under model.dense_sharding=`mode`: leaves that carry
  a split already (expert stacks, expert-parallel) keep it; the dense ones get
  `dense_spec` over DENSE_AXES[mode]: fsdp all devices, hsdp each node's devices
  (replicated across nodes: the all-gathers stay on the fast links). The leading layer
  axis of scanned blocks (`transformer.is_stacked`) is never split."""
  axes = DENSE_AXES[mode]
  size = int(np.prod([mesh.shape[a] for a in axes]))

  def place(path, a):
    if any(part is not None for part in a.sharding.spec):
      return a.sharding
    lead = 1 if is_stacked(path) else 0
    spec = dense_spec(a.shape[lead:], axes, size)
    return NamedSharding(mesh, P(*[None] * lead, *spec) if spec else P())
  return jax.tree_util.tree_map_with_path(place, abstract_params)
