"""`auto`: pick the cheapest strategy per call from the live routing (HierMoE's d*).

Runs per device inside the MoE's shard_map. From its own routing each device
counts the rows it would send to every destination device / node, once per
(token, expert) and once per (token, destination); a psum over `node` gives the
rows each stage-1 receiver forwards inside its node; a pmax over all devices
gives every hop's peak rows per peer, identical on all devices. The cost model
prices each strategy from those peaks and every device takes the same argmin
among the `candidates` (the strategies the model can prefer on this mesh).
The decision costs two small reductions (one psum, one pmax), no all-to-all.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from hiermoe_jax import cost
from hiermoe_jax.config import STRATEGIES
from hiermoe_jax.mesh import AXES, LOCAL, NODE, MeshShape


def _counts(dest_TK, groups: int):
  """Rows per destination group: per (token, expert) pair, and per distinct (token, group)."""
  hit_TKG = dest_TK[..., None] == jnp.arange(groups)
  pairs_G = jnp.sum(hit_TKG, axis=(0, 1), dtype=jnp.int32)
  distinct_G = jnp.sum(jnp.any(hit_TKG, axis=1), axis=0, dtype=jnp.int32)
  return pairs_G, distinct_G


def _peak_excluding(counts, me):
  return jnp.max(jnp.where(jnp.arange(counts.shape[0]) == me, 0, counts))


def live_peaks(slots_TK, *, shape: MeshShape, experts_per_device: int) -> dict:
  """Per strategy, per hop: the most rows any device sends to one other peer.

  Two collectives in all (one psum, one pmax): each costs a latency on slow links.
  """
  device_TK = slots_TK // experts_per_device
  pairs_dev, distinct_dev = _counts(device_TK, shape.devices)
  pairs_node, distinct_node = _counts(device_TK // shape.local, shape.nodes)
  me_dev = jax.lax.axis_index(AXES)
  me_node, me_local = jax.lax.axis_index(NODE), jax.lax.axis_index(LOCAL)

  # Stage-1 receiver (n', l) forwards, to local peer g', what every source
  # (n, l) sent to device (n', g'): a sum over the node axis.
  through_2D = jax.lax.psum(jnp.stack([pairs_dev, distinct_dev]), NODE)
  mine_2G = jax.lax.dynamic_slice_in_dim(through_2D, me_node * shape.local, shape.local, axis=1)
  stage2_pairs, stage2_distinct = (_peak_excluding(row, me_local) for row in mine_2G)

  names = ("flat", "flat_dedup", "hier", "hier", "hier_dedup", "hier_dedup")
  local_peaks = jnp.stack([
      _peak_excluding(pairs_dev, me_dev), _peak_excluding(distinct_dev, me_dev),
      _peak_excluding(pairs_node, me_node), stage2_pairs,
      _peak_excluding(distinct_node, me_node), stage2_distinct])
  peaks = jax.lax.pmax(local_peaks, AXES)
  out: dict = {}
  for name, value in zip(names, peaks):
    out[name] = out.get(name, ()) + (value,)
  return out


def candidates(shape: MeshShape, top_k: int) -> tuple[str, ...]:
  """The strategies `auto` compiles as branches: those the model can prefer.

  - A dedup strategy never sends more rows than its plain twin through the same
    stages, so with top_k > 1 only the dedup ones compete (on a tie - no token with
    two experts behind one destination - they cost the same bytes). Every branch
    costs: under `lax.switch` its VJP residuals are carried, zero-filled, by all.
  - top_k == 1 leaves nothing to deduplicate: the plain ones.
  - On a mesh with one node (or one device per node) a hierarchical strategy is its
    flat twin plus a hop that only copies rows locally: flat only, so nothing is
    left to decide.
  """
  flat, hier = ("flat_dedup", "hier_dedup") if top_k > 1 else ("flat", "hier")
  if shape.nodes == 1 or shape.local == 1:
    return (flat,)
  return (flat, hier)


def choose(peaks: dict, profile: cost.CostProfile, names: tuple[str, ...], *,
           shape: MeshShape, d_model: int, bytes_per_elem: int):
  """(position in `names` of the cheapest, predicted ms of every strategy)."""
  predicted = {name: jnp.asarray(cost.predict_from_peak_rows(
      name, peaks[name], profile, shape, d_model, bytes_per_elem), jnp.float32)
      for name in STRATEGIES}
  return jnp.argmin(jnp.stack([predicted[name] for name in names])), predicted


def run_cheapest(branch: Callable[[str], Callable], operands: tuple, slots_TK, *,
                 profile: cost.CostProfile, shape: MeshShape, experts_per_device: int,
                 top_k: int, d_model: int, bytes_per_elem: int):
  """branch(name)(*operands) for the candidate the model prices cheapest on this
  call's routing; returns (its output, its index in STRATEGIES, predicted ms).

  With one candidate there is nothing to decide: it runs alone, without the two
  reductions, and predicted ms is {} (as for a fixed strategy).
  """
  names = candidates(shape, top_k)
  if len(names) == 1:
    return branch(names[0])(*operands), jnp.int32(STRATEGIES.index(names[0])), {}
  peaks = live_peaks(slots_TK, shape=shape, experts_per_device=experts_per_device)
  position, predicted = choose(peaks, profile, names, shape=shape, d_model=d_model,
                               bytes_per_elem=bytes_per_elem)
  out = jax.lax.switch(position, [branch(name) for name in names], *operands)
  index = jnp.asarray([STRATEGIES.index(name) for name in names], jnp.int32)[position]
  return out, index, predicted
