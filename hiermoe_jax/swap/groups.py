"""Whole re-placements as swap candidates (docs/design.md, section 7). Pure numpy.

Pairs move two experts at a time; some placements that pay need many moves at
once. Two candidate plans, each priced by `search`'s model and migration price:

- colocate: experts often chosen by the same tokens go to one node (fewer
  inter-node rows: a token's experts on one node cost one row). Greedy over the
  window's co-selection matrix: experts in order of load, each to the node with
  room whose members it is most co-selected with (ties: the lighter node); inside
  a node, heaviest first to the lightest device with room.
- pack: an EPLB-like packing of the window's loads (heaviest first to the
  lightest device with room): cuts the compute imbalance and the per-peer peak.

Both then relabel nodes and devices to keep as many experts where they are as
possible (permutations for <= 7 labels, else greedy), and experts that stay on
a device keep their slot: only `moved` slices travel. Deterministic.
"""

from __future__ import annotations

import itertools

import numpy as np

from hiermoe_jax.mesh import MeshShape
from hiermoe_jax.swap.eplb import balanced_packing
from hiermoe_jax.swap.search import SwapPlan, placement_time_ms, slice_price_ms

EXACT_MATCH_LIMIT = 7  # labels matched by trying every permutation


def coselection(ids: np.ndarray, num_experts: int) -> np.ndarray:
  """[E, E] tokens choosing both experts (diagonal: tokens choosing the expert)."""
  flat = ids.reshape(-1, ids.shape[-1])
  hits = np.zeros((flat.shape[0], num_experts), np.float32)
  np.put_along_axis(hits, flat, 1.0, axis=1)
  return (hits.T @ hits).astype(np.float64)


def _by_load(loads: np.ndarray) -> np.ndarray:
  return np.argsort(-loads, kind="stable")


def colocate_devices(cosel: np.ndarray, shape: MeshShape) -> np.ndarray:
  """Device label of each logical expert: co-selected experts share a node."""
  num_experts = cosel.shape[0]
  loads = np.diag(cosel).copy()
  room = num_experts // shape.nodes
  affinity = np.zeros((shape.nodes, num_experts))
  total, count = np.zeros(shape.nodes), np.zeros(shape.nodes, np.int64)
  node_of = np.zeros(num_experts, np.int64)
  for e in _by_load(loads):
    node = min((n for n in range(shape.nodes) if count[n] < room),
               key=lambda n: (-affinity[n, e], total[n], n))
    node_of[e] = node
    affinity[node] += cosel[e]
    total[node] += loads[e]
    count[node] += 1
  device_of = np.zeros(num_experts, np.int64)
  for node in range(shape.nodes):
    members = np.flatnonzero(node_of == node)
    device_of[members] = node * shape.local + balanced_packing(loads[members], shape.local)
  return device_of


def pack_devices(loads: np.ndarray, shape: MeshShape) -> np.ndarray:
  """Device label of each logical expert: loads packed evenly over devices."""
  return balanced_packing(loads, shape.devices)


def _match(overlap: np.ndarray) -> np.ndarray:
  """Old label for each new label maximising the summed overlap [new, old]."""
  n = overlap.shape[0]
  if n <= EXACT_MATCH_LIMIT:
    best = max(itertools.permutations(range(n)),
               key=lambda perm: (overlap[np.arange(n), perm].sum(), tuple(-p for p in perm)))
    return np.asarray(best)
  out, free_new, free_old = np.zeros(n, np.int64), set(range(n)), set(range(n))
  for _ in range(n):
    a, b = max(((a, b) for a in free_new for b in free_old),
               key=lambda ab: (overlap[ab], -ab[0], -ab[1]))
    out[a] = b
    free_new.discard(a)
    free_old.discard(b)
  return out


def _overlap(new_of: np.ndarray, old_of: np.ndarray, units: int) -> np.ndarray:
  overlap = np.zeros((units, units))
  np.add.at(overlap, (new_of, old_of), 1.0)
  return overlap


def relabel(device_of: np.ndarray, placement: np.ndarray, shape: MeshShape) -> np.ndarray:
  """Renames nodes, then devices inside each node, so most experts stay put."""
  per_device = placement.shape[0] // shape.devices
  old_device = np.empty_like(device_of)
  old_device[placement] = np.arange(placement.shape[0]) // per_device
  node_map = _match(_overlap(device_of // shape.local, old_device // shape.local, shape.nodes))
  node_of = node_map[device_of // shape.local]
  local_of = device_of % shape.local
  for node in range(shape.nodes):
    members = np.flatnonzero(node_of == node)
    stays = members[old_device[members] // shape.local == node]
    local_map = _match(_overlap(local_of[stays], old_device[stays] % shape.local, shape.local))
    local_of[members] = local_map[local_of[members]]
  return node_of * shape.local + local_of


def to_placement(device_of: np.ndarray, placement: np.ndarray, shape: MeshShape) -> np.ndarray:
  """Slot -> expert: experts that stay on their device keep their slot; arrivals
  fill the freed slots in ascending order of slot and expert."""
  num_experts = placement.shape[0]
  per_device = num_experts // shape.devices
  new = np.full(num_experts, -1, placement.dtype)
  stays = device_of[placement] == np.arange(num_experts) // per_device
  new[stays] = placement[stays]
  for device in range(shape.devices):
    slots = np.arange(device * per_device, (device + 1) * per_device)
    free = slots[new[slots] < 0]
    arrivals = np.sort(np.setdiff1d(np.flatnonzero(device_of == device), new[slots]))
    new[free] = arrivals
  return new


def plan_of(kind: str, new: np.ndarray, ids: np.ndarray, placement: np.ndarray,
            shape: MeshShape, config) -> SwapPlan:
  """A priced plan moving every expert whose device changes."""
  num_experts = placement.shape[0]
  slot_of = np.argsort(new)
  sources = np.flatnonzero(slot_of[placement] // (num_experts // shape.devices)
                           != np.arange(num_experts) // (num_experts // shape.devices))
  migration = sum(slice_price_ms(int(s), int(slot_of[placement[s]]), num_experts,
                                      shape, config) for s in sources)
  return SwapPlan(
      placement=new, pairs=(), kind=kind, moved=len(sources),
      time_before_ms=placement_time_ms(ids, placement, shape, config),
      time_after_ms=placement_time_ms(ids, new, shape, config),
      migration_ms=float(migration), bytes_to_move=len(sources) * config.bytes_per_swap // 2)


def group_plans(ids: np.ndarray, placement: np.ndarray, shape: MeshShape,
                config) -> list[SwapPlan]:
  """The colocate and pack plans of a window (checked ids and placement)."""
  cosel = coselection(ids, placement.shape[0])
  plans = []
  for kind, device_of in (("colocate", colocate_devices(cosel, shape)),
                          ("pack", pack_devices(np.diag(cosel).copy(), shape))):
    new = to_placement(relabel(device_of, placement, shape), placement, shape)
    plans.append(plan_of(kind, new, ids, placement, shape, config))
  return plans
