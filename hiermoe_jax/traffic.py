"""Exact, host-side traffic statistics of every strategy (numpy, no devices).

`stats(topk_ids, mesh_shape=(N, G), num_experts=E, ...)` replays each strategy's
hops on the routing with the same rules as the exchange engine: first the
capacity decision (per device, per expert, the first C pairs in token order
kept; dispatch/keep.py), then a row per (item, destination peer) in item order,
the first `capacity` rows per (device, peer) kept, receivers ordering rows by
source peer then position, and the expert stage keeping the first `capacity`
entries per local expert (stage buffers are sized so that these keep all). It
works on a table of (token, expert) pairs, so meshes far larger than this machine
(32x8) are cheap.

Only rows that leave their device count; "inter" rows cross nodes.
"""

from __future__ import annotations

import numpy as np

from hiermoe_jax.dispatch import registry
from hiermoe_jax.dispatch.base import peer_along, receiver, tier_peers, traffic_classes
from hiermoe_jax.dispatch.capacity import capacities
from hiermoe_jax.mesh import MeshShape
from hiermoe_jax.validate import check_experts_fit, check_placement


def _ranks(keys_sorted_by_group: np.ndarray) -> np.ndarray:
  """Position of each element within its run of equal group keys (input sorted)."""
  n = keys_sorted_by_group.shape[0]
  starts = np.r_[True, keys_sorted_by_group[1:] != keys_sorted_by_group[:-1]] if n else np.r_[[]]
  first = np.maximum.accumulate(np.where(starts, np.arange(n), 0)) if n else np.r_[[]]
  return np.arange(n) - first


def kept_pairs(slots_ATK: np.ndarray, pair_cap: int) -> np.ndarray:
  """The capacity decision on the host: per device, per expert, the first
  `pair_cap` pairs in token order (any bijection of expert ids gives the same)."""
  dev, tok, _ = (a.ravel() for a in np.indices(slots_ATK.shape))
  slot = slots_ATK.ravel()
  order = np.lexsort((tok, slot, dev))
  ranks = np.empty_like(order)
  ranks[order] = _ranks((dev * (slot.max(initial=0) + 1) + slot)[order])
  return (ranks < pair_cap).reshape(slots_ATK.shape)


def simulate(slots_ATK: np.ndarray, strategy: str, shape: MeshShape, num_experts: int, *,
             hop_caps=None, expert_cap=None, kept_ATK=None) -> dict:
  """Replays one strategy on the pairs the capacity decision kept (kept_ATK; None:
  all). Capacities of None mean unlimited (dropless)."""
  strat = registry.get_strategy(strategy)
  devices, tokens, top_k = slots_ATK.shape
  per_device = num_experts // shape.devices
  dev, tok, k = (a.ravel() for a in np.indices(slots_ATK.shape))
  slot = slots_ATK.ravel().astype(np.int64)
  alive = np.ones(slot.shape, bool) if kept_ATK is None else kept_ATK.ravel().copy()
  row = tok * top_k + k if not strat.dedup else tok.copy()  # current row on `cur`
  cur = dev.copy()
  result = {"hops": [], "dropped": {"capacity": int(np.sum(~alive))}}
  for h, tier in enumerate(strat.tiers):
    peers = tier_peers(tier, shape)
    peer = peer_along(slot // per_device, tier, shape)
    # Row-parts: unique (device, row, peer) among live pairs, ordered for ranking.
    live = np.flatnonzero(alive)
    key = np.stack([cur[live], peer[live], row[live]])
    parts, inverse = np.unique(key.T, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    pos = _ranks(parts[:, 0] * peers + parts[:, 1])
    cap = hop_caps[h] if hop_caps is not None else int(pos.max(initial=0)) + 1
    kept_part = pos < cap
    sent = np.zeros((devices, peers), np.int64)
    np.add.at(sent, (parts[kept_part, 0], parts[kept_part, 1]), 1)
    result["hops"].append({"tier": tier, "sent": sent})
    result["dropped"][tier] = int(np.sum(~kept_part[inverse]))
    alive[live[~kept_part[inverse]]] = False
    # Move the kept pairs: new device and row id (source peer, position).
    moved = live[kept_part[inverse]]
    src_dev, dst_peer = cur[moved], peer[moved]
    source_index = peer_along(src_dev, tier, shape)
    row[moved] = source_index * cap + pos[inverse][kept_part[inverse]]
    cur[moved] = receiver(src_dev, dst_peer, tier, shape)
  # Expert stage: first `expert_cap` entries per (device, local expert), by (row, k).
  live = np.flatnonzero(alive)
  local = slot[live] - cur[live] * per_device
  order = np.lexsort((k[live], row[live], local, cur[live]))
  ranks = np.empty_like(order)
  ranks[order] = _ranks((cur[live] * per_device + local)[order])
  over = ranks >= (expert_cap if expert_cap is not None else np.inf)
  result["dropped"]["expert"] = int(over.sum())
  alive[live[over]] = False
  result["kept_ATK"] = alive.reshape(slots_ATK.shape)
  return result


def dedup_rate(slots_ATK: np.ndarray, experts_per_group: int) -> float:
  groups = np.sort(slots_ATK // experts_per_group, axis=-1)
  distinct = 1 + np.sum(groups[..., 1:] != groups[..., :-1], axis=-1)
  return float(1.0 - distinct.sum() / slots_ATK.size)


def inter_node_floor(slots_ATK: np.ndarray, shape: MeshShape, num_experts: int) -> int:
  """Rows that must cross nodes: each token once per distinct remote node."""
  nodes = np.sort(slots_ATK // (num_experts // shape.nodes), axis=-1)
  first = np.concatenate([np.ones_like(nodes[..., :1], bool),
                          nodes[..., 1:] != nodes[..., :-1]], axis=-1)
  home = (np.arange(shape.devices) // shape.local)[:, None, None]
  return int(np.sum(first & (nodes != home)))


def stats(topk_ids, *, mesh_shape, num_experts: int, placement=None, d_model: int,
          bytes_per_elem: int = 4, strategies=None, capacity_factor: float | None = None,
          chunks: int = 1) -> dict:
  """Per-strategy rows, bytes, per-peer maxima, dedup rates and drops.

  topk_ids: int [N*G, T, K] logical expert ids, one row of tokens per device in
  mesh order. placement: [E] physical slot -> logical expert (identity if None).
  capacity_factor: None for dropless buffers, else the MoEConfig capacity factor.
  strategies: names to replay (default: every registered strategy).
  chunks: MoEConfig.overlap_chunks - the capacity decision is taken on all T tokens,
  then each chunk runs through its own buffers: rows and drops add up, a peak rows
  per peer is the largest over the chunks.
  """
  shape = MeshShape(*mesh_shape)
  ids = np.asarray(topk_ids)
  if ids.ndim != 3 or ids.shape[0] != shape.devices:
    raise ValueError(f"topk_ids has shape {ids.shape}; expected [N*G={shape.devices}, T, K]")
  check_experts_fit(num_experts, shape)
  if ids.min() < 0 or ids.max() >= num_experts:
    raise ValueError(f"topk_ids must lie in [0, {num_experts}); got [{ids.min()}, {ids.max()}]")
  slot_of = (np.arange(num_experts) if placement is None
             else np.argsort(check_placement(placement, num_experts)))
  slots = slot_of[ids]
  _, tokens, top_k = ids.shape
  rates = {"node": dedup_rate(slots, num_experts // shape.nodes),
           "device": dedup_rate(slots, num_experts // shape.devices)}
  out = {}
  for name in registry.names() if strategies is None else strategies:
    strategy = registry.get_strategy(name)
    hop_caps = expert_cap = None
    kept = np.ones(slots.shape, bool)
    if capacity_factor is not None:
      caps = capacities(strategy, tokens=tokens, top_k=top_k, num_experts=num_experts,
                        shape=shape, capacity_factor=capacity_factor, dropless=False,
                        chunks=chunks)
      hop_caps, expert_cap, kept = caps.hops, caps.expert, kept_pairs(slots, caps.pairs)
    per = tokens // chunks
    sims = [simulate(slots[:, c * per:(c + 1) * per], name, shape, num_experts,
                     hop_caps=hop_caps, expert_cap=expert_cap,
                     kept_ATK=kept[:, c * per:(c + 1) * per]) for c in range(chunks)]
    rows = {"inter": 0, "intra": 0}
    peak = {"inter": 0, "intra": 0}
    for hop in (hop for sim in sims for hop in sim["hops"]):
      devices, peers = hop["sent"].shape
      classes = traffic_classes(np.arange(devices)[:, None], np.arange(peers)[None, :],
                                hop["tier"], shape)
      for tier_class, mask in classes.items():
        masked = np.where(mask, hop["sent"], 0)
        rows[tier_class] += int(masked.sum())
        peak[tier_class] = max(peak[tier_class], int(masked.max(initial=0)))
    out[name] = {
        "strategy": name,
        "rows": rows,
        "bytes": {t: r * d_model * bytes_per_elem for t, r in rows.items()},
        "max_rows_per_peer": peak,
        "dedup_rate": dict(rates),
        "dropped": sum(sum(sim["dropped"].values()) for sim in sims),
        "dropped_by_stage": {stage: sum(sim["dropped"][stage] for sim in sims)
                             for stage in sims[0]["dropped"]},
    }
  return out
