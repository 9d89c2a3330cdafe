"""Static buffer sizes of every stage of a strategy.

Each hop has a capacity C: the rows one device may send to one peer. The expert
stage has a capacity per local expert. `capacity_factor` scales the expected
load under uniform top-k routing (K distinct experts drawn uniformly); `dropless`
takes the worst case, so nothing can be dropped.
"""

from __future__ import annotations

import dataclasses
import math

from hiermoe_jax.dispatch.base import Strategy, tier_peers
from hiermoe_jax.mesh import MeshShape


def hit_probability(num_experts: int, top_k: int, group_size: int) -> float:
  """P(a token's top-k experts include at least one of `group_size` given experts)."""
  miss = math.comb(num_experts - group_size, top_k) / math.comb(num_experts, top_k)
  return 1.0 - miss


def hop_group_size(strategy: Strategy, hop: int, shape: MeshShape, num_experts: int) -> int:
  """Experts behind one destination peer of hop `hop`: the hops so far have resolved
  a token's destination to one of prod(their peers) groups of experts."""
  return num_experts // math.prod(tier_peers(t, shape) for t in strategy.tiers[:hop + 1])


@dataclasses.dataclass(frozen=True)
class Capacities:
  hops: tuple[int, ...]  # rows per (device, peer) for each hop
  expert: int  # rows per local expert at the expert stage


def capacities(strategy: Strategy, *, tokens: int, top_k: int, num_experts: int,
               shape: MeshShape, capacity_factor: float, dropless: bool) -> Capacities:
  """Per-hop and per-expert buffer sizes; `tokens` is T, tokens per device."""
  t, k, e = tokens, top_k, num_experts
  experts_per_device = e // shape.devices

  def size(expected: float, worst: int) -> int:
    return worst if dropless else max(1, min(worst, math.ceil(capacity_factor * expected)))

  hops = []
  rows_in = t  # rows arriving at the current hop's sender, worst case
  for i, tier in enumerate(strategy.tiers):
    peers = tier_peers(tier, shape)
    group = hop_group_size(strategy, i, shape, e)
    if i == 0:  # the sender's own T tokens
      if strategy.dedup:
        expected, worst = t * hit_probability(e, k, group), t
      else:
        expected, worst = t * k / peers, t * min(k, group)
    else:  # forwarded: rows arrive from every peer of the hop before
      sources = tier_peers(strategy.tiers[i - 1], shape)
      if strategy.dedup:
        expected, worst = sources * t * hit_probability(e, k, group), min(rows_in, sources * t)
      else:
        expected, worst = t * k / peers, min(rows_in, sources * t * min(k, group))
    cap = size(expected, worst)
    hops.append(cap)
    rows_in = peers * cap
  # Expert stage: a row carries an expert at most once, and so does a token.
  expert_expected = t * k / experts_per_device
  expert_worst = min(rows_in, shape.devices * t)
  return Capacities(tuple(hops), size(expert_expected, expert_worst))
