"""The train state, its shardings, sharded initialisation and the jitted steps.

The model lives as NNX state split three ways: `params` (nnx.Param, trained by
AdamW), `buffers` (router biases and expert placements: state, not trained) and a
static graphdef. Steps are pure functions of (TrainState, batch).

Sharded initialisation never materialises an unsharded copy: eval_shape gives the
abstract state, its PartitionSpecs give the shardings, and jit with those
out_shardings builds each shard on its own device.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

import hiermoe_jax as hm
from hiermoe_jax import mesh as mesh_lib
from models.config import Config, ModelConfig
from models.optimizer import applied_updates, learning_rate, make_optimizer
from models.transformer import Transformer, block_site, layer_state, moe_aux_by_layer


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
  finite: jax.Array  # bool []: loss, aux loss and grad norm finite; else the update was skipped
  # Per MoE layer: routing ids [tokens, K] (token-sharded) for the swap controller;
  # () unless train.swap_interval > 0, so that the ids stay off the hot path.
  topk_ids: tuple = ()


class Model:
  """Static pieces shared by the steps: config, mesh, graphdef, optimizer."""

  def __init__(self, cfg: Config, mesh: Mesh):
    self.cfg, self.mesh = cfg, mesh
    self.tx = make_optimizer(cfg.train)
    self.schedule = learning_rate(cfg.train)
    self.graphdef, abstract = nnx.get_abstract_model(self._new_model, mesh)
    self.moe_layers = nnx.merge(self.graphdef, abstract).moe_layers  # Transformer's
    abs_params, abs_buffers = nnx.split_state(abstract, nnx.Param, ...)
    replicated = NamedSharding(mesh, mesh_lib.replicated())
    param_sh = _shardings(abs_params)
    opt_sh = optax.tree_map_params(
        self.tx, lambda _, s: s, jax.eval_shape(self.tx.init, abs_params), param_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    self.state_shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                                      buffers=_shardings(abs_buffers), rng=replicated)
    self.batch_sharding = NamedSharding(mesh, mesh_lib.sharded_rows(2))

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

  def _forward(self, params, buffers, inputs_BS):
    model = nnx.merge(self.graphdef, params, buffers)
    logits_BSV, intermediates = nnx.capture(model, nnx.Intermediate)(inputs_BS)
    auxes = moe_aux_by_layer(intermediates)
    return logits_BSV, auxes

  def _loss(self, params, buffers, inputs_BS, targets_BS):
    logits_BSV, auxes = self._forward(params, buffers, inputs_BS)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BSV, targets_BS).mean()
    aux_loss = sum((a.aux_loss for a in auxes), jnp.float32(0))
    return ce + aux_loss, (ce, aux_loss, auxes)

  def train_step(self, state: TrainState, inputs_BS, targets_BS):
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    (_, (ce, aux_loss, auxes)), grads = grad_fn(state.params, state.buffers, inputs_BS,
                                                targets_BS)
    grad_norm = optax.tree.norm(grads)
    # A NaN or Inf in any gradient makes the norm non-finite: three scalars cover the step.
    finite = jnp.isfinite(ce) & jnp.isfinite(aux_loss) & jnp.isfinite(grad_norm)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    buffers = self._update_router_biases(params, state.buffers, auxes)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    devices = self.mesh.devices.size
    placements = placements_of(state.buffers, self.moe_layers, self.cfg.model).values()
    metrics = StepMetrics(
        loss=ce, aux_loss=aux_loss, grad_norm=grad_norm,
        lr=self.schedule(applied_updates(state.opt_state)),  # the lr this update uses
        dedup_node=_stack([a.dedup_rate["node"] for a in auxes]),
        dedup_device=_stack([a.dedup_rate["device"] for a in auxes]),
        dropped=_stack([a.dropped for a in auxes]),
        imbalance=_stack([imbalance(a.expert_counts, p, devices)
                          for a, p in zip(auxes, placements)]),
        strategy_index=_stack([a.strategy_index for a in auxes]),
        finite=finite,
        topk_ids=tuple(a.topk_ids for a in auxes) if self.cfg.train.swap_interval else ())
    # A non-finite step consumes its batch (step and rng advance) but keeps the old
    # params, optimizer state and buffers: a select, so the donated state stays valid.
    kept = _select(finite, (params, opt_state, buffers),
                   (state.params, state.opt_state, state.buffers))
    new_state = TrainState(step=state.step + 1, params=kept[0], opt_state=kept[1],
                           buffers=kept[2], rng=rng)
    return new_state, metrics

  def eval_step(self, state: TrainState, inputs_BS, targets_BS):
    logits_BSV, _ = self._forward(state.params, state.buffers, inputs_BS)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BSV, targets_BS).mean()

  def _update_router_biases(self, params, buffers, auxes):
    """DeepSeek's aux-loss-free bias update with this step's expert counts."""
    model = nnx.merge(self.graphdef, params, buffers)
    model.update_router_biases([aux.expert_counts for aux in auxes])
    return nnx.state(model, nnx.Not(nnx.Param))

  @functools.cached_property
  def jit_train_step(self):
    return jax.jit(self.train_step, donate_argnums=0,
                   out_shardings=(self.state_shardings, None))

  @functools.cached_property
  def jit_eval_step(self):
    return jax.jit(self.eval_step)


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
