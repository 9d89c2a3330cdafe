"""The exchange engine: runs any `Strategy` inside `shard_map`, per device.

Legend: T tokens on this device, K top-k, M expert entries a row carries (K for
dedup strategies, 1 otherwise), I items to place, P peers of a hop, C capacity,
S = P * C buffer rows, X local experts, R rows, D model dim.

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
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hiermoe_jax import experts as experts_lib
from hiermoe_jax.dispatch.base import Strategy, peer_along
from hiermoe_jax.dispatch.capacity import tier_peers
from hiermoe_jax.mesh import LOCAL, NODE, MeshShape
from hiermoe_jax.permute import permute, unpermute

_TIER_AXES = {"device": (NODE, LOCAL), "node": NODE, "local": LOCAL}


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static facts the engine needs: mesh shape, experts, implementations."""
  shape: MeshShape
  num_experts: int
  permute_impl: str = "xla"
  expert_compute: str = "einsum"
  ragged: bool = False  # send only filled rows with jax.lax.ragged_all_to_all (GPU/TPU)

  @property
  def experts_per_device(self) -> int:
    return self.num_experts // self.shape.devices

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


def _exchange(buf_SD, send_P, recv_P, axes, peers: int, ragged: bool):
  """All-to-all of [P*C, D] blocks whose first send_P[p] rows of block p are filled.

  Padded: every block travels whole. Ragged: only the filled rows travel, into
  the same [P*C, D] receive layout (row q*C + i from peer q), zeros elsewhere.
  """
  if not ragged:
    return jax.lax.all_to_all(buf_SD, axes, 0, 0, tiled=True)
  capacity = buf_SD.shape[0] // peers
  blocks_P = jnp.arange(peers, dtype=jnp.int32) * capacity
  me = jax.lax.axis_index(axes)
  return jax.lax.ragged_all_to_all(
      buf_SD, jnp.zeros_like(buf_SD), blocks_P, send_P,
      jnp.full((peers,), me * capacity, jnp.int32), recv_P, axis_name=axes)


def _assign(valid_IP, capacity: int, packed: bool):
  """Places items at (peer, position) in item order; returns [P*C] item table.

  packed=False: slot = p * C + position (a padded buffer per peer).
  packed=True: peers' kept items are contiguous (for ragged expert compute).
  """
  num_items, peers = valid_IP.shape
  pos_IP = jnp.cumsum(valid_IP, axis=0, dtype=jnp.int32) - 1
  kept_IP = valid_IP & (pos_IP < capacity)
  counts_P = jnp.sum(kept_IP, axis=0, dtype=jnp.int32)
  if packed:
    base_P = jnp.cumsum(counts_P) - counts_P
  else:
    base_P = jnp.arange(peers, dtype=jnp.int32) * capacity
  size = peers * capacity
  index_IP = jnp.where(kept_IP, base_P + pos_IP, size)
  items_IP = jnp.broadcast_to(jnp.arange(num_items, dtype=jnp.int32)[:, None], valid_IP.shape)
  table_S = jnp.full((size,), -1, jnp.int32).at[index_IP.reshape(-1)].set(
      items_IP.reshape(-1), mode="drop")
  return table_S, kept_IP, counts_P


def _entry_valid_IMP(slots_IM, peer_IM, peers: int):
  return (slots_IM >= 0)[..., None] & (peer_IM[..., None] == jnp.arange(peers))


def _hop(rows_RD, item_src_I, slots_IM, w_IM, tier: str, capacity: int, layout: Layout):
  """One all-to-all over `tier`. Returns received rows, their metadata, plan, stats."""
  peers = tier_peers(tier, layout.shape)
  peer_IM = layout.peer_of(slots_IM, tier)
  entry_IMP = _entry_valid_IMP(slots_IM, peer_IM, peers)
  valid_IP = jnp.any(entry_IMP, axis=1)
  table_S, kept_IP, counts_P = _assign(valid_IP, capacity, packed=False)
  dropped = jnp.sum(entry_IMP & ~kept_IP[:, None, :], dtype=jnp.int32)

  filled_S = table_S >= 0
  safe_S = jnp.where(filled_S, table_S, 0)
  send_src_S = jnp.where(filled_S, item_src_I[safe_S], -1)
  send_rows_SD = permute(rows_RD, send_src_S, impl=layout.permute_impl)
  # Keep only the entries that belong to the peer each slot is sent to.
  peer_S = jnp.arange(table_S.shape[0], dtype=jnp.int32) // capacity
  slots_SM = slots_IM[safe_S]
  mine_SM = filled_S[:, None] & (slots_SM >= 0) & (layout.peer_of(slots_SM, tier) == peer_S[:, None])
  # Slots travel as float32 beside the weights (exact below 2**24): one collective.
  meta_SM2 = jnp.concatenate([
      jnp.where(mine_SM, slots_SM, -1).astype(jnp.float32),
      jnp.where(mine_SM, w_IM[safe_S], 0.0)], axis=-1)

  axes = _TIER_AXES[tier]
  # Metadata is small and always padded: empty slots must read as -1, not 0.
  recv_meta_SM2 = jax.lax.all_to_all(meta_SM2, axes, 0, 0, tiled=True)
  recv_P = (jax.lax.all_to_all(counts_P, axes, 0, 0, tiled=True) if layout.ragged
            else counts_P)
  recv_rows_SD = _exchange(send_rows_SD, counts_P, recv_P, axes, peers, layout.ragged)
  m = slots_IM.shape[1]
  recv_slots_SM = jax.lax.stop_gradient(recv_meta_SM2[:, :m]).astype(jnp.int32)
  recv_w_SM = recv_meta_SM2[:, m:]
  plan = HopPlan(send_src_S, rows_RD.shape[0], counts_P, recv_P)
  return recv_rows_SD, recv_slots_SM, recv_w_SM, plan, HopStats(counts_P, dropped)


def _unhop(y_SD, plan: HopPlan, tier: str, layout: Layout):
  """Reverse of `_hop`: send results back and add them into the sender's rows."""
  peers = tier_peers(tier, layout.shape)
  back_SD = _exchange(y_SD, plan.received_P, plan.sent_P, _TIER_AXES[tier], peers,
                      layout.ragged)
  ones_S = jnp.ones(back_SD.shape[:1], back_SD.dtype)
  return unpermute(back_SD, plan.send_src_S, ones_S, num_tokens=plan.num_rows,
                   impl=layout.permute_impl)


def local_experts(rows_RD, slots_RM, w_RM, *, expert_params, capacity: int, layout: Layout):
  """Expands rows to their local experts, runs the FFNs, pre-reduces per row.

  Returns (out_RD, dropped pairs). The default `expert_fn` of `run`.
  """
  num_local = layout.experts_per_device
  m = slots_RM.shape[1]
  me = jax.lax.axis_index((NODE, LOCAL))
  local_IM = slots_RM - me * num_local
  entry_IMP = _entry_valid_IMP(slots_RM, local_IM, num_local)
  valid_IP = entry_IMP.reshape(-1, num_local)  # items are (row, entry) pairs
  packed = layout.expert_compute == "ragged_dot"
  table_S, kept_IP, counts_P = _assign(valid_IP, capacity, packed=packed)
  dropped = jnp.sum(valid_IP & ~kept_IP, dtype=jnp.int32)

  filled_S = table_S >= 0
  row_S = jnp.where(filled_S, table_S // m, -1)
  w_S = jnp.where(filled_S, w_RM.reshape(-1)[jnp.where(filled_S, table_S, 0)], 0.0)
  x_SD = permute(rows_RD, row_S, impl=layout.permute_impl)
  dtype = rows_RD.dtype
  gate, up, down = (expert_params[k].astype(dtype) for k in ("gate", "up", "down"))
  with jax.named_scope("expert_compute"):
    if packed:
      y_SD = experts_lib.experts_ragged(x_SD, counts_P, gate, up, down)
    else:
      x_XCD = x_SD.reshape(num_local, capacity, -1)
      y_SD = experts_lib.experts_einsum(x_XCD, gate, up, down).reshape(x_SD.shape)
  # Pre-reduce: one weighted vector per received row, whatever its expert count.
  out_RD = unpermute(y_SD, row_S, w_S, num_tokens=rows_RD.shape[0], impl=layout.permute_impl)
  return out_RD, dropped


class ExchangeStats(NamedTuple):
  hops: tuple[HopStats, ...]
  expert_dropped: jax.Array


def run(x_TD, slots_TK, w_TK, *, strategy: Strategy, hop_caps: tuple[int, ...], layout: Layout,
        expert_fn):
  """Dispatch, expert compute and combine on one device. Returns (y_TD, stats).

  expert_fn(rows_RD, slots_RM, w_RM) -> (out_RD, dropped) computes, for every
  received row, the weighted sum of its local experts' outputs (see
  `local_experts`); benchmarks pass a cheap stand-in to time the exchange alone.
  """
  num_tokens, top_k = slots_TK.shape
  if strategy.dedup:
    item_src, slots_IM, w_IM = jnp.arange(num_tokens, dtype=jnp.int32), slots_TK, w_TK
  else:  # one item per (token, expert) pair
    item_src = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), top_k)
    slots_IM, w_IM = slots_TK.reshape(-1, 1), w_TK.reshape(-1, 1)

  rows_RD, plans, hop_stats = x_TD, [], []
  with jax.named_scope(f"dispatch_{strategy.name}"):
    for tier, capacity in zip(strategy.tiers, hop_caps):
      rows_RD, slots_IM, w_IM, plan, stats = _hop(rows_RD, item_src, slots_IM, w_IM, tier,
                                                  capacity, layout)
      item_src = jnp.arange(rows_RD.shape[0], dtype=jnp.int32)
      plans.append(plan)
      hop_stats.append(stats)
  with jax.named_scope("experts"):
    y_RD, expert_dropped = expert_fn(rows_RD, slots_IM, w_IM)
  with jax.named_scope(f"combine_{strategy.name}"):
    for tier, plan in reversed(list(zip(strategy.tiers, plans))):
      y_RD = _unhop(y_RD, plan, tier, layout)
  return y_RD, ExchangeStats(tuple(hop_stats), expert_dropped)
