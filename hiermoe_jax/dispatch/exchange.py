"""The exchange engine, DeepEP-shaped: `dispatch` and `combine` for any `Strategy`.

Per device, inside `jax.shard_map`:

    rows_RD, slots_RM, w_RM, handle = dispatch(x_TD, slots_TK, w_TK, strategy, ...)
    y_RD = <the caller's expert compute>(rows_RD, slots_RM, w_RM)   # experts.py
    y_TD = combine(y_RD, handle)

Legend (docs/legend.md): T tokens on this device, K top-k, M expert entries a
row carries (K for dedup strategies, 1 otherwise), I items to place, P peers of a
hop, C capacity, S = P * C buffer rows, R rows, D model dim.

A row travels with its metadata: M physical expert slots (-1 where the entry is
not for the receiving group) and M routing weights. Each hop assigns items to
(peer, position) in item order, drops what overflows the capacity
(deterministically: lower item index wins), gathers the rows into a [P*C, D]
buffer and runs one all-to-all. Combine runs the hops in reverse; each receiver
has already summed its experts' weighted outputs per row (pre-reduce), so a
sender's unpermute only adds the returned vectors back into its rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hiermoe_jax.dispatch import wire
from hiermoe_jax.dispatch.assign import assign, entry_targets_IMP
from hiermoe_jax.dispatch.base import Strategy, peer_along, tier_peers
from hiermoe_jax.mesh import MeshShape
from hiermoe_jax.permute import permute_blocks, unpermute_blocks


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static facts the engine needs: the expert hierarchy, experts, implementations."""
  shape: MeshShape
  num_experts: int
  permute_impl: str = "xla"
  expert_compute: str = "einsum"
  ragged: bool = False  # send only filled rows with jax.lax.ragged_all_to_all (GPU/TPU)
  comm_dtype: str | None = None  # dispatch rows on the wire (wire.py); None: their dtype
  # Gather and scatter-add each peer's block of a hop on its own (CPU meshes:
  # `per_peer_blocks_for`).
  per_peer_blocks: bool = False

  @property
  def experts_per_device(self) -> int:
    return self.num_experts // self.shape.devices

  @staticmethod
  def per_peer_blocks_for(mesh) -> bool:
    """XLA:CPU splits an all-to-all into one operand per peer, so per-peer gathers feed
    it directly (docs/design.md, section 4); XLA:GPU sends one buffer, which per-peer
    gathers would only copy once more (measured on a deviceless H200 compile)."""
    devices = getattr(mesh, "devices", None)  # an AbstractMesh has none: the default backend
    platform = devices.flat[0].platform if devices is not None else jax.default_backend()
    return platform == "cpu"

  def peer_of(self, slots, tier: str):
    """Destination peer, along `tier`, of physical expert slots."""
    return peer_along(slots // self.experts_per_device, tier, self.shape)


class HopStats(NamedTuple):
  rows_to_peer_P: jax.Array  # rows this device sends to each peer (self included)
  dropped_pairs: jax.Array  # (token, expert) pairs lost to this hop's capacity


class HopPlan(NamedTuple):
  send_src_S: jax.Array  # which sender row fills each buffer slot (-1: padding)
  num_rows: int  # rows on the sender side, for the reverse unpermute
  sent_P: jax.Array  # rows sent to each peer
  received_P: jax.Array  # rows received from each peer


def _all_to_all(buf_SD, axes):
  """Padded all-to-all of [P*C, ...] blocks over `axes`: every block travels whole.
  Over no mesh axis (a one-device tier) the buffer is already where it goes."""
  return jax.lax.all_to_all(buf_SD, axes, 0, 0, tiled=True) if axes else buf_SD


def _exchange(buf_SD, send_P, recv_P, axes, peers: int, ragged: bool):
  """All-to-all of [P*C, D] blocks whose first send_P[p] rows of block p are filled.

  Padded: every block travels whole. Ragged: only the filled rows travel, into
  the same [P*C, D] receive layout (row q*C + i from peer q), zeros elsewhere.
  """
  if not ragged or not axes:
    return _all_to_all(buf_SD, axes)
  capacity = buf_SD.shape[0] // peers
  blocks_P = jnp.arange(peers, dtype=jnp.int32) * capacity
  me = jax.lax.axis_index(axes)
  return jax.lax.ragged_all_to_all(
      buf_SD, jnp.zeros_like(buf_SD), blocks_P, send_P,
      jnp.full((peers,), me * capacity, jnp.int32), recv_P, axis_name=axes)


def _hop(rows_RD, item_src_I, slots_IM, w_IM, tier: str, capacity: int, layout: Layout,
         first: bool):
  """One all-to-all over `tier` (`first`: rows_RD are the device's own tokens).
  Returns received rows, their metadata, plan, stats."""
  peers = tier_peers(tier, layout.shape)
  peer_IM = layout.peer_of(slots_IM, tier)
  entry_IMP = entry_targets_IMP(slots_IM, peer_IM, peers)
  valid_IP = jnp.any(entry_IMP, axis=1)
  table_S, kept_IP, counts_P = assign(valid_IP, capacity, packed=False)
  dropped = jnp.sum(entry_IMP & ~kept_IP[:, None, :], dtype=jnp.int32)

  filled_S = table_S >= 0
  safe_S = jnp.where(filled_S, table_S, 0)
  send_src_S = jnp.where(filled_S, item_src_I[safe_S], -1)
  # With per_peer_blocks the first hop gathers each peer's block on its own (slices of
  # that concatenate fold into the all-to-all's per-peer operands: the buffer is written
  # once). A later hop gathers from the blocks the previous hop received; per-peer
  # gathers there would first copy those into one array, so it gathers once.
  send_rows_SD = permute_blocks(rows_RD, send_src_S,
                                blocks=peers if first and layout.per_peer_blocks else 1,
                                impl=layout.permute_impl)
  # Keep only the entries that belong to the peer each slot is sent to.
  peer_S = jnp.arange(table_S.shape[0], dtype=jnp.int32) // capacity
  slots_SM = slots_IM[safe_S]
  mine_SM = (filled_S[:, None] & (slots_SM >= 0)
             & (layout.peer_of(slots_SM, tier) == peer_S[:, None]))
  # Slots travel as float32 beside the weights (exact below 2**24): one collective.
  meta = jnp.concatenate([  # [S, 2 * M]
      jnp.where(mine_SM, slots_SM, -1).astype(jnp.float32),
      jnp.where(mine_SM, w_IM[safe_S], 0.0)], axis=-1)

  axes = layout.shape.tier_axes(tier)
  # Metadata is small and always padded: empty slots must read as -1, not 0.
  recv_meta = _all_to_all(meta, axes)
  recv_P = _all_to_all(counts_P, axes) if layout.ragged else counts_P
  # The padded exchange closes over no traced value, as the fp8 wire's custom VJP
  # needs (MoEConfig refuses an fp8 wire with the ragged exchange).
  move = (functools.partial(_exchange, send_P=counts_P, recv_P=recv_P, axes=axes, peers=peers,
                            ragged=True) if layout.ragged
          else functools.partial(_all_to_all, axes=axes))
  recv_rows_SD = wire.send(send_rows_SD, move, layout.comm_dtype, raw_bits=not layout.ragged)
  m = slots_IM.shape[1]
  recv_slots_SM = jax.lax.stop_gradient(recv_meta[:, :m]).astype(jnp.int32)
  recv_w_SM = recv_meta[:, m:]
  plan = HopPlan(send_src_S, rows_RD.shape[0], counts_P, recv_P)
  return recv_rows_SD, recv_slots_SM, recv_w_SM, plan, HopStats(counts_P, dropped)


def _unhop(y_SD, plan: HopPlan, tier: str, layout: Layout):
  """Reverse of `_hop`: send results back and add them into the sender's rows."""
  peers = tier_peers(tier, layout.shape)
  on_wire = wire.combine_dtype(y_SD.dtype, layout.comm_dtype)
  axes = layout.shape.tier_axes(tier)
  if layout.ragged:
    back_SD = _exchange(y_SD.astype(on_wire), plan.received_P, plan.sent_P, axes, peers, True)
  else:
    back_SD = wire.carry(y_SD.astype(on_wire), functools.partial(_all_to_all, axes=axes),
                         raw_bits=True)
  return unpermute_blocks(back_SD.astype(y_SD.dtype), plan.send_src_S,
                          blocks=peers if layout.per_peer_blocks else 1,
                          num_tokens=plan.num_rows, impl=layout.permute_impl)


class Handle(NamedTuple):
  """What `combine` needs to reverse a `dispatch` (and the hops' statistics)."""
  strategy: Strategy
  layout: Layout
  plans: tuple[HopPlan, ...]
  stats: tuple[HopStats, ...]


def dispatch(x_TD, slots_TK, w_TK, strategy: Strategy, *, capacities: tuple[int, ...],
             layout: Layout):
  """Sends each token to the devices holding its experts, hop by hop.

  slots_TK: physical expert slots of each token's top-k; w_TK: their weights.
  capacities: rows per (device, peer) of each hop (`capacity.capacities(...).hops`).
  Returns (rows_RD, slots_RM, w_RM, handle): the rows that arrived on this device,
  each with its M expert entries (slot, or -1 where not for this device; weight).
  """
  num_tokens, top_k = slots_TK.shape
  if strategy.dedup:
    item_src, slots_IM, w_IM = jnp.arange(num_tokens, dtype=jnp.int32), slots_TK, w_TK
  else:  # one item per (token, expert) pair
    item_src = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), top_k)
    slots_IM, w_IM = slots_TK.reshape(-1, 1), w_TK.reshape(-1, 1)

  rows_RD, plans, stats = x_TD, [], []
  with jax.named_scope(f"dispatch_{strategy.name}"):
    for tier, capacity in zip(strategy.tiers, capacities):
      with jax.named_scope(tier):
        rows_RD, slots_IM, w_IM, plan, hop_stats = _hop(rows_RD, item_src, slots_IM, w_IM, tier,
                                                        capacity, layout, first=not plans)
      item_src = jnp.arange(rows_RD.shape[0], dtype=jnp.int32)
      plans.append(plan)
      stats.append(hop_stats)
  return rows_RD, slots_IM, w_IM, Handle(strategy, layout, tuple(plans), tuple(stats))


def combine(y_RD, handle: Handle):
  """Returns each received row's (pre-reduced) output to its token: y_TD."""
  with jax.named_scope(f"combine_{handle.strategy.name}"):
    for tier, plan in reversed(list(zip(handle.strategy.tiers, handle.plans))):
      with jax.named_scope(tier):
        y_RD = _unhop(y_RD, plan, tier, handle.layout)
  return y_RD
