"""`auto`: pick the cheapest strategy per call from the live routing (HierMoE's d*).

Runs per device inside the MoE's shard_map. From its own routing each device
counts the rows it would send to every destination device / node, once per
(token, expert) and once per (token, destination); a psum over `node` gives the
rows each stage-1 receiver forwards inside its node; a pmax over all devices
gives every hop's peak rows per peer, identical on all devices. The cost model
prices each strategy from those peaks and every device takes the same argmin.
The decision costs two small reductions (one psum, one pmax), no all-to-all.
"""

from __future__ import annotations

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


def candidates(shape: MeshShape) -> tuple[str, ...]:
  """Strategies worth pricing on this mesh.

  On a mesh with one node (or one device per node) a hierarchical strategy is
  its flat twin plus a hop that only copies rows locally, which the cost model
  (pricing communication) would call free; so only the flat ones compete there.
  """
  if shape.nodes == 1 or shape.local == 1:
    return ("flat", "flat_dedup")
  return STRATEGIES


def choose(peaks: dict, profile: cost.CostProfile, *, shape: MeshShape, d_model: int,
           bytes_per_elem: int):
  """(index into STRATEGIES of the cheapest candidate, predicted ms per strategy)."""
  predicted = {name: jnp.asarray(cost.predict_from_peak_rows(
      name, peaks[name], profile, shape, d_model, bytes_per_elem), jnp.float32)
      for name in STRATEGIES}
  names = candidates(shape)
  best = jnp.argmin(jnp.stack([predicted[name] for name in names]))
  index = jnp.asarray([STRATEGIES.index(name) for name in names], jnp.int32)[best]
  return index, predicted
