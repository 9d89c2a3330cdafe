"""The functional core: `moe_apply(params, x, config=, mesh=) -> (y, aux)`.

Routing runs on the token-sharded batch under jit; then, per device inside
`jax.shard_map` over the expert hierarchy (`config.expert_axes`):

    route -> keep (capacity) -> exchange.dispatch -> experts.local_experts
          -> exchange.combine -> aux

with the strategy named by `config.dispatch` (or, for "auto", the one
`dispatch.auto` prices cheapest on this call's routing).
Legend (docs/legend.md): T tokens, K top-k, E experts, D model dim.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from hiermoe_jax import cost
from hiermoe_jax import routing as routing_lib
from hiermoe_jax.config import MoEConfig
from hiermoe_jax.dispatch import auto, exchange, keep, registry, wire
from hiermoe_jax.dispatch.base import Strategy, traffic_classes
from hiermoe_jax.dispatch.capacity import capacities
from hiermoe_jax.errors import ConfigError
from hiermoe_jax.experts import local_experts, shared_experts
from hiermoe_jax.mesh import MeshShape
from hiermoe_jax.params import check_params, check_router_bias, param_specs
from hiermoe_jax.validate import check_placement, shape_of, validate_for_mesh, validate_tokens


@flax.struct.dataclass
class MoEAux:
  """Losses and statistics of one MoE call, reduced over all devices.

  `aux_loss` is the weighted sum to add to the training loss. Traffic counts
  only rows that leave their device: "inter" crosses nodes, "intra" stays in one.
  """
  aux_loss: jax.Array
  load_balance_loss: jax.Array
  z_loss: jax.Array
  expert_counts: jax.Array  # [E] (token, expert) pairs per logical expert
  topk_ids: jax.Array  # [tokens, K] logical expert ids, token-sharded in mesh order
  dropped: jax.Array  # (token, expert) pairs dropped at any stage
  # "capacity" (the pre-dispatch decision, dispatch/keep.py), then per hop tier and
  # "expert": stage buffers are sized never to drop a kept pair, so those read 0.
  dropped_by_stage: dict[str, jax.Array]
  rows: dict[str, jax.Array]  # {"inter", "intra"} rows sent, summed over devices
  # {"inter", "intra"} bytes of those rows on the wire, dispatch + combine, by wire dtype
  wire_bytes: dict[str, jax.Array]
  max_rows_per_peer: dict[str, jax.Array]  # {"inter", "intra"} max over (device, peer)
  dedup_rate: dict[str, jax.Array]  # {"node", "device"} copies removed by dedup
  strategy_index: jax.Array  # index into dispatch.names() of the strategy that ran
  predicted_ms: dict[str, jax.Array]  # "auto" only: the cost model's time per strategy
  # False when the placement was not a permutation (only a traced one gets this
  # far: a concrete one is refused before tracing); the output is then all NaN.
  placement_ok: jax.Array
  strategy: str = flax.struct.field(pytree_node=False, default="flat")  # config.dispatch

  def strategy_ran(self) -> str:
    """Name of the strategy that ran (resolves "auto"; needs a concrete aux)."""
    return registry.names()[int(self.strategy_index)]


def is_permutation(placement, num_experts: int) -> jax.Array:
  """In-graph check of a traced placement: its sorted values are range(E)."""
  return jnp.all(jnp.sort(placement) == jnp.arange(num_experts, dtype=placement.dtype))


def inverse_placement(placement, num_experts: int):
  """slot_of[logical expert] = physical slot holding it."""
  if placement is None:
    return jnp.arange(num_experts, dtype=jnp.int32)
  return jnp.argsort(jnp.asarray(placement, jnp.int32)).astype(jnp.int32)


def dedup_rates(ids_TK, *, experts_per_group: int) -> jax.Array:
  """Fraction of (token, expert) copies removed by sending once per group."""
  group_TK = ids_TK // experts_per_group
  sorted_TK = jnp.sort(group_TK, axis=-1)
  distinct = jnp.sum(1 + jnp.sum(sorted_TK[:, 1:] != sorted_TK[:, :-1], axis=-1))
  return 1.0 - distinct / ids_TK.size


def _traffic(hop_stats, tiers, shape: MeshShape):
  """Per-device inter/intra rows and per-peer maxima from the hops' send counts."""
  zero = jnp.int32(0)
  rows = {"inter": zero, "intra": zero}
  peak = {"inter": zero, "intra": zero}
  me = shape.index("flat")
  for tier, stats in zip(tiers, hop_stats):
    counts_P = stats.rows_to_peer_P
    peers = jnp.arange(counts_P.shape[0])
    for name, mask in traffic_classes(me, peers, tier, shape).items():
      rows[name] = rows[name] + jnp.sum(jnp.where(mask, counts_P, 0))
      peak[name] = jnp.maximum(peak[name], jnp.max(jnp.where(mask, counts_P, 0)))
  return rows, peak


def _use_ragged(config: MoEConfig, mesh: Mesh) -> bool:
  """ragged_all_to_all where the backend has it; XLA:CPU does not, so fall back."""
  if config.all_to_all != "ragged":
    return False
  platform = mesh.devices.flat[0].platform
  if platform == "cpu":
    warnings.warn("MoEConfig.all_to_all='ragged': jax.lax.ragged_all_to_all is not "
                  "implemented on XLA:CPU; using the padded all-to-all instead", stacklevel=3)
    return False
  return True


def _device_moe(strategy: Strategy, x_TD, slots_TK, w_TK, expert_params, *, caps, layout,
                chunks: int):
  """One strategy on this device: dispatch -> local experts -> combine, on `chunks`
  independent slices of the tokens (MoEConfig.overlap_chunks): nothing orders one
  chunk's all-to-alls after another's expert compute, so XLA's scheduler may run
  them concurrently.

  Returns y and its statistics, reduced over the devices: (dropped per stage,
  rows per link class, peak rows per peer per link class).
  """
  cap = caps[strategy.name]
  per_chunk = x_TD.shape[0] // chunks
  ys, dropped, rows, peak = [], [], [], []
  for c in range(chunks):
    part = slice(c * per_chunk, (c + 1) * per_chunk)
    with jax.named_scope(f"chunk{c}") if chunks > 1 else contextlib.nullcontext():
      rows_RD, slots_RM, w_RM, handle = exchange.dispatch(
          x_TD[part], slots_TK[part], w_TK[part], strategy, capacities=cap.hops, layout=layout)
      with jax.named_scope("experts"):
        y_RD, expert_dropped = local_experts(rows_RD, slots_RM, w_RM, expert_params,
                                             capacity=cap.expert, layout=layout)
      ys.append(exchange.combine(y_RD, handle))
    chunk_rows, chunk_peak = _traffic(handle.stats, strategy.tiers, layout.shape)
    rows.append(chunk_rows)
    peak.append(chunk_peak)
    dropped.append({tier: s.dropped_pairs for tier, s in zip(strategy.tiers, handle.stats)}
                   | {"expert": expert_dropped})
  total = lambda parts, op: jax.tree.map(lambda *v: functools.reduce(op, v), *parts)  # noqa: E731
  axes = layout.shape.token_axes  # every group of the hierarchy counts its own tokens
  return jnp.concatenate(ys), (jax.lax.psum(total(dropped, jnp.add), axes),
                               jax.lax.psum(total(rows, jnp.add), axes),
                               jax.lax.pmax(total(peak, jnp.maximum), axes))


def _device_step(x_TD, slots_TK, w_TK, expert_params, *, dispatch, caps, pairs, layout,
                 profile, top_k, bytes_per_elem, chunks):
  """Per device: the capacity decision on all its tokens (`pairs` kept per expert;
  None: dropless), then `dispatch`, or for "auto" the candidate it prices cheapest
  on the kept pairs."""
  slots_TK, w_TK, capacity_dropped = keep.apply_keep(slots_TK, w_TK, pairs)
  capacity_dropped = jax.lax.psum(capacity_dropped, layout.shape.token_axes)
  body = functools.partial(_device_moe, caps=caps, layout=layout, chunks=chunks)
  operands = (x_TD, slots_TK, w_TK, expert_params)
  if dispatch != "auto":
    y_TD, (dropped, *rest) = body(registry.get_strategy(dispatch), *operands)
    index, predicted = jnp.int32(registry.names().index(dispatch)), {}
  else:
    (y_TD, (dropped, *rest)), index, predicted = auto.run_cheapest(
        body, operands, slots_TK, profile=profile, shape=layout.shape,
        experts_per_device=layout.experts_per_device, top_k=top_k, d_model=x_TD.shape[-1],
        bytes_per_elem=bytes_per_elem)
  return y_TD, ({"capacity": capacity_dropped} | dropped, *rest, index, predicted)


def device_step(config: MoEConfig, mesh: Mesh, tokens_per_device: int, *, profile=None,
                dispatch: str | None = None):
  """The per-device body `moe_apply` runs under `shard_map`, with its static plan
  (capacities, the capacity decision's pairs per expert, layout) bound.

  `dispatch` overrides `config.dispatch` (the host-side auto times each candidate
  exactly as the step would run it). Returns f(x_TD, slots_TK, w_TK, experts) ->
  (y_TD, (dropped by stage, rows, peak rows per peer, strategy index, predicted ms)).
  """
  dispatch = dispatch or config.dispatch
  shape = shape_of(config, mesh)
  names = auto.candidates(shape, config.top_k) if dispatch == "auto" else (dispatch,)
  caps = {name: capacities(registry.get_strategy(name), tokens=tokens_per_device,
                           top_k=config.top_k, num_experts=config.num_experts, shape=shape,
                           capacity_factor=config.capacity_factor, dropless=config.dropless,
                           chunks=config.overlap_chunks)
          for name in names}
  pairs = None if config.dropless else caps[names[0]].pairs  # the same for every strategy
  layout = exchange.Layout(shape, config.num_experts, config.permute_impl, config.expert_compute,
                           ragged=_use_ragged(config, mesh), comm_dtype=config.comm_dtype,
                           per_peer_blocks=exchange.Layout.per_peer_blocks_for(mesh))
  return functools.partial(_device_step, dispatch=dispatch, caps=caps, pairs=pairs,
                           layout=layout, profile=profile, top_k=config.top_k,
                           bytes_per_elem=wire.bytes_per_elem(config.d_model, config.dtype,
                                                              config.comm_dtype),
                           chunks=config.overlap_chunks)


def load_profile(config: MoEConfig) -> cost.CostProfile | None:
  """`auto`'s cost profile (None for a fixed strategy); a bad one names the field."""
  if config.dispatch != "auto":
    return None
  try:
    return cost.load_profile(config.cost_profile)
  except ConfigError as e:
    raise ConfigError(f"MoEConfig.cost_profile={config.cost_profile!r} is invalid: {e}") from None


def moe_apply(params: dict, x, *, config: MoEConfig, mesh: Mesh, placement=None,
              router_bias=None) -> tuple[jax.Array, MoEAux]:
  """Applies the MoE block to x [..., d_model] (tokens sharded over the mesh).

  placement: optional [E] permutation, physical slot -> logical expert (a list or
    any integer array); expert weights in `params["experts"]` are stored in that
    physical order.
  router_bias: the DeepSeek-V3 selection bias [E] (state from `init_router_bias`).

  Capacity (dropless=False): per device's tokens, per logical expert, the first C
  (token, expert) pairs in token order are kept, the rest dropped (dispatch/keep.py);
  no stage buffer drops a kept pair. So outputs and gradients do not depend on the
  placement, on `overlap_chunks` or on the strategy: a swap is a relabelling.
  """
  shape = validate_for_mesh(config, mesh)
  check_params(params, config)
  check_router_bias(router_bias, config)
  if router_bias is not None:
    router_bias = jnp.asarray(router_bias, jnp.float32)
  if placement is not None:
    placement = check_placement(placement, config.num_experts)
  validate_tokens(math.prod(x.shape[:-1]), x.shape[-1], config, shape)
  return _moe_apply(params, x, placement, router_bias, config=config, mesh=mesh,
                    profile=load_profile(config))


# Under an outer jit this is inlined; called eagerly, it compiles once per
# (config, mesh, shapes) instead of dispatching every op through shard_map.
@functools.partial(jax.jit, static_argnames=("config", "mesh", "profile"))
def _moe_apply(params, x, placement, router_bias, *, config: MoEConfig, mesh: Mesh, profile):
  shape = shape_of(config, mesh)
  lead, d_in = x.shape[:-1], x.shape[-1]
  x_TD = x.reshape(-1, d_in)
  tokens_per_device = x_TD.shape[0] // (shape.batch * shape.devices)

  with jax.named_scope("router"):
    logits_TE = x_TD.astype(jnp.float32) @ params["router"]["kernel"].astype(jnp.float32)
    routing = routing_lib.route(logits_TE, config, router_bias)
    lb_loss = routing_lib.load_balance_loss(routing, config.num_experts)
    z = routing_lib.z_loss(logits_TE)
  slots_TK = inverse_placement(placement, config.num_experts)[routing.ids_TK]

  rows_spec = shape.rows(2)
  expert_specs = param_specs(config)["experts"]
  step = jax.shard_map(
      device_step(config, mesh, tokens_per_device, profile=profile),
      mesh=mesh,
      in_specs=(rows_spec, rows_spec, rows_spec, expert_specs),
      out_specs=(rows_spec, jax.sharding.PartitionSpec()),
      # Pallas kernels (interpreted on CPU) trace their bodies with index math
      # that shard_map's varying-axes check rejects. Skipping the check is safe
      # here: every input is sharded and the replicated outputs are explicit psums.
      check_vma=config.permute_impl != "pallas")
  dtype = jnp.dtype(config.dtype)
  bytes_per_elem = wire.bytes_per_elem(config.d_model, dtype, config.comm_dtype)
  y_TD, (dropped, rows, peak, strategy_index, predicted) = step(
      x_TD.astype(dtype), slots_TK, routing.weights_TK, params["experts"])
  if config.shared_width:
    with jax.named_scope("shared_experts"):
      y_TD = y_TD + shared_experts(params, x_TD.astype(dtype))
  # A wrong placement must never give a plausible answer: poison the output.
  placement_ok = (jnp.bool_(True) if placement is None
                  else is_permutation(placement, config.num_experts))
  y_TD = jnp.where(placement_ok, y_TD, jnp.nan)

  aux = MoEAux(
      aux_loss=config.load_balance_weight * lb_loss + config.z_loss_weight * z,
      load_balance_loss=lb_loss,
      z_loss=z,
      expert_counts=routing_lib.expert_counts(routing.ids_TK, config.num_experts),
      topk_ids=routing.ids_TK,
      dropped=sum(dropped.values()),
      dropped_by_stage=dropped,
      rows=rows,
      wire_bytes={k: v.astype(jnp.float32) * 2 * config.d_model * bytes_per_elem
                  for k, v in rows.items()},
      max_rows_per_peer=peak,
      dedup_rate={
          "node": dedup_rates(slots_TK, experts_per_group=config.num_experts // shape.nodes),
          "device": dedup_rates(slots_TK, experts_per_group=config.num_experts // shape.devices),
      },
      strategy_index=strategy_index,
      predicted_ms=predicted,
      placement_ok=placement_ok,
      strategy=config.dispatch,
  )
  return y_TD.reshape(*lead, d_in).astype(x.dtype), aux


def collect_aux(intermediates) -> list[MoEAux]:
  """Every MoEAux in a captured tree, in path order.

  Works on `nnx.capture(model, nnx.Intermediate)(x)[1]` and on Linen's
  "intermediates" collection alike.
  """
  return [leaf for leaf in jax.tree.leaves(intermediates, is_leaf=lambda a: isinstance(a, MoEAux))
          if isinstance(leaf, MoEAux)]
