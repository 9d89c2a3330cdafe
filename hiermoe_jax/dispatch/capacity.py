"""Static buffer sizes of every stage of a strategy, sized never to drop a kept pair.

Drops are decided before dispatch (`keep.py`): per token group of T tokens, per
logical expert, at most C pairs are kept. Each hop has a capacity (the rows one
device may send to one peer) and the expert stage one per local expert; both are
the worst case given that cap, whatever the placement, so a stage buffer never
overflows and `dropped_by_stage` reports drops only at "capacity". With t rows
per chunk (t = T / overlap_chunks), c = min(C, t) pairs per (token group, expert)
in a chunk, g experts behind one destination peer, K top-k, and s = the token
groups whose rows reach one sender of this hop (1 at the first hop):
  - dedup hop (one row per (token, peer)):      s * min(t, g * c)
  - plain hop (one row per (token, expert)):    s * min(t * min(K, g), g * c)
  - expert stage, per local expert:             (all expert devices) * c
each also capped by the rows that can reach the stage. `dropless` takes C = T,
which keeps every pair and gives the unconditional worst case.
"""

from __future__ import annotations

import dataclasses
import math

from hiermoe_jax.dispatch.base import Strategy, tier_peers
from hiermoe_jax.dispatch.keep import pair_capacity
from hiermoe_jax.mesh import MeshShape


def hop_group_size(strategy: Strategy, hop: int, shape: MeshShape, num_experts: int) -> int:
  """Experts behind one destination peer of hop `hop`: the hops so far have resolved
  a token's destination to one of prod(their peers) groups of experts."""
  return num_experts // math.prod(tier_peers(t, shape) for t in strategy.tiers[:hop + 1])


@dataclasses.dataclass(frozen=True)
class Capacities:
  hops: tuple[int, ...]  # rows per (device, peer) for each hop
  expert: int  # rows per local expert at the expert stage
  pairs: int  # C: pairs kept per (token group, logical expert), `keep.pair_capacity`


def capacities(strategy: Strategy, *, tokens: int, top_k: int, num_experts: int,
               shape: MeshShape, capacity_factor: float, dropless: bool,
               chunks: int = 1) -> Capacities:
  """Per-hop and per-expert buffer sizes of one chunk; `tokens` is T, tokens per
  device (the token group of the capacity decision), split into `chunks` chunks."""
  pairs = pair_capacity(tokens=tokens, top_k=top_k, num_experts=num_experts,
                        capacity_factor=capacity_factor, dropless=dropless)
  t = tokens // chunks
  c = min(pairs, t)
  hops = []
  rows_in = t if strategy.dedup else t * top_k  # items at the current hop's sender
  for i, tier in enumerate(strategy.tiers):
    group = hop_group_size(strategy, i, shape, num_experts)
    sources = math.prod(tier_peers(prev, shape) for prev in strategy.tiers[:i])
    per_source = min(t, group * c) if strategy.dedup else min(t * min(top_k, group), group * c)
    hops.append(min(rows_in, sources * per_source))
    rows_in = tier_peers(tier, shape) * hops[-1]
  # Expert stage: every expert device's token group sends at most c pairs per expert.
  return Capacities(tuple(hops), min(rows_in, shape.devices * c), pairs)
