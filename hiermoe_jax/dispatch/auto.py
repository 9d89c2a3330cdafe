"""`auto`: pick the cheapest strategy per call from the live routing (HierMoE's d*).

Runs per device inside the MoE's shard_map. From its own routing each device
counts the rows every registered strategy would send to each peer of its first
hop; for a two-hop strategy, a psum over the first hop's axis gives the rows each
first-hop receiver forwards; a pmax over all devices gives every hop's peak rows
per peer, identical on all devices. The cost model prices each strategy from those
peaks and every device takes the same argmin among the `candidates` (the
strategies the model can prefer on this mesh), under one `lax.switch`.
The decision costs small reductions (a psum per first tier, one pmax), no all-to-all.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from hiermoe_jax import cost
from hiermoe_jax.dispatch import registry
from hiermoe_jax.dispatch.base import Strategy, peer_along, tier_peers
from hiermoe_jax.mesh import MeshShape


def _rows_to(dest_TK, groups: int, dedup: bool):
  """Rows sent to each destination group: one per distinct (token, group) if dedup,
  else one per (token, expert) pair."""
  hit_TKU = dest_TK[..., None] == jnp.arange(groups)
  if dedup:
    return jnp.sum(jnp.any(hit_TKU, axis=1), axis=0, dtype=jnp.int32)
  return jnp.sum(hit_TKU, axis=(0, 1), dtype=jnp.int32)


def _peak_excluding(counts, me):
  return jnp.max(jnp.where(jnp.arange(counts.shape[0]) == me, 0, counts))


def _local_peaks(strategy: Strategy, device_TK, shape: MeshShape, through_A=None) -> list:
  """This device's peak rows to one peer, per hop of `strategy`. through_A: for a
  two-hop strategy, the rows toward each final device summed over the first hop's
  group - what a first-hop receiver forwards."""
  first = strategy.tiers[0]
  # Pairs dropped by the capacity decision (device -1) go nowhere, along any tier.
  peer_TK = jnp.where(device_TK >= 0, peer_along(device_TK, first, shape), -1)
  sent = _rows_to(peer_TK, tier_peers(first, shape), strategy.dedup)
  peaks = [_peak_excluding(sent, shape.index(first))]
  if len(strategy.tiers) == 2:
    through_NL = through_A.reshape(shape.nodes, shape.local)
    if first == "inter":  # receiver (n', l) forwards to the devices of node n'
      mine = jax.lax.dynamic_index_in_dim(through_NL, shape.index("inter"), 0, keepdims=False)
    else:  # receiver (n, l') forwards to the devices with local index l'
      mine = jax.lax.dynamic_index_in_dim(through_NL, shape.index("intra"), 1, keepdims=False)
    peaks.append(_peak_excluding(mine, shape.index(strategy.tiers[1])))
  return peaks


def live_peaks(slots_TK, *, shape: MeshShape, experts_per_device: int,
               names: tuple[str, ...] | None = None) -> dict:
  """Per strategy (all registered ones by default), per hop: the most rows any
  device sends to one other peer. Identical on every device.

  Collectives: one psum per distinct first tier of the two-hop strategies, one
  pmax; each costs a latency on slow links.
  """
  strategies = [registry.get_strategy(n) for n in (registry.names() if names is None else names)]
  device_TK = slots_TK // experts_per_device
  through = {}
  two_hop = [s for s in strategies if len(s.tiers) == 2]
  for first in dict.fromkeys(s.tiers[0] for s in two_hop):
    group = [s for s in two_hop if s.tiers[0] == first]
    toward = jnp.stack([_rows_to(device_TK, shape.devices, s.dedup) for s in group])
    axes = shape.tier_axes(first)
    summed = jax.lax.psum(toward, axes) if axes else toward
    through.update({s.name: summed[i] for i, s in enumerate(group)})
  local = {s.name: _local_peaks(s, device_TK, shape, through.get(s.name)) for s in strategies}
  # Over every token group too, so that all devices take the same branch.
  flat = jax.lax.pmax(jnp.stack([p for peaks in local.values() for p in peaks]), shape.token_axes)
  out, i = {}, 0
  for name, peaks in local.items():
    out[name] = tuple(flat[i:i + len(peaks)])
    i += len(peaks)
  return out


def candidates(shape: MeshShape, top_k: int) -> tuple[str, ...]:
  """The strategies `auto` compiles as branches: those the model can prefer.

  - A dedup strategy never sends more rows than its plain twin through the same
    stages, so with top_k > 1 only the dedup ones compete (on a tie - no token with
    two experts behind one destination - they cost the same bytes). Every branch
    costs: under `lax.switch` its VJP residuals are carried, zero-filled, by all.
  - top_k == 1 leaves nothing to deduplicate: the plain ones.
  - On a mesh with one node (or one device per node) a hierarchical strategy is its
    flat twin plus a hop that only copies rows locally: one-hop ones only.
  """
  single_tier = shape.nodes == 1 or shape.local == 1
  return tuple(
      s.name for s in map(registry.get_strategy, registry.names())
      if s.auto_candidate and s.dedup == (top_k > 1) and not (single_tier and len(s.tiers) > 1))


def choose(peaks: dict, profile: cost.CostProfile, names: tuple[str, ...], *,
           shape: MeshShape, d_model: int, bytes_per_elem: int):
  """(position in `names` of the cheapest, predicted ms of every strategy in `peaks`)."""
  predicted = {name: jnp.asarray(cost.predict_from_peak_rows(
      name, rows, profile, shape, d_model, bytes_per_elem), jnp.float32)
      for name, rows in peaks.items()}
  return jnp.argmin(jnp.stack([predicted[name] for name in names])), predicted


def _uniform(branch: Callable, keys: tuple[str, ...]) -> Callable:
  """`branch` with its per-stage drop counts filled out to `keys`: every branch of
  a switch must return the same structure."""
  def run(*operands):
    y, (dropped, *rest) = branch(*operands)
    return y, ({key: dropped.get(key, jnp.int32(0)) for key in keys}, *rest)
  return run


def run_cheapest(body: Callable, operands: tuple, slots_TK, *, profile: cost.CostProfile,
                 shape: MeshShape, experts_per_device: int, top_k: int, d_model: int,
                 bytes_per_elem: int):
  """body(strategy, *operands) for the candidate the model prices cheapest on this
  call's routing; body returns (y, (dropped_by_stage, ...)). Returns (its output
  with drops counted over every candidate's stages, its index in the registry,
  predicted ms per strategy).

  With one candidate there is nothing to decide: it runs alone, without the
  reductions, and predicted ms is {} (as for a fixed strategy).
  """
  names = candidates(shape, top_k)
  strategies = [registry.get_strategy(name) for name in names]
  keys = tuple(dict.fromkeys(t for s in strategies for t in s.tiers)) + ("expert",)
  branches = [_uniform(lambda *ops, s=s: body(s, *ops), keys) for s in strategies]
  if len(names) == 1:
    return branches[0](*operands), jnp.int32(registry.names().index(names[0])), {}
  peaks = live_peaks(slots_TK, shape=shape, experts_per_device=experts_per_device)
  position, predicted = choose(peaks, profile, names, shape=shape, d_model=d_model,
                               bytes_per_elem=bytes_per_elem)
  out = jax.lax.switch(position, branches, *operands)
  index = jnp.asarray([registry.names().index(name) for name in names], jnp.int32)[position]
  return out, index, predicted
