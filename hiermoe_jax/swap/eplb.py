"""DeepSeek's expert-parallel load balancer (EPLB), hierarchical policy, as a placement.

A baseline for the swap search (docs/design.md, section 7): EPLB balances the
(token, expert) pairs each device computes, from per-expert loads, ignoring which
experts tokens pick together. Its hierarchical policy, without replicas (a
placement here is a permutation, so each expert has exactly one slot):

  1. Expert groups (consecutive logical ids, E / num_groups each, e.g. the
     group-limited router's groups) are packed onto nodes, num_groups / N per
     node, greedily by load: heaviest group first, onto the least-loaded node
     that still has room (ties: lowest node index).
  2. Inside each node, its experts are packed the same way onto its L devices,
     X = E / A per device.

A group therefore never spans nodes. Result: `placement[slot] = logical expert`
with device a holding slots [a*X, (a+1)*X) (its experts in ascending logical id).

Legend (docs/legend.md): E experts, N nodes, L local devices, X experts per device.
"""

from __future__ import annotations

import numpy as np

from hiermoe_jax.errors import ConfigError
from hiermoe_jax.mesh import MeshShape
from hiermoe_jax.validate import check_experts_fit


def expert_load(topk_ids, num_experts: int) -> np.ndarray:
  """(token, expert) pairs per logical expert, float64 [E], over any [..., K] ids."""
  return np.bincount(np.asarray(topk_ids).ravel(), minlength=num_experts).astype(np.float64)


def balanced_packing(weights, packs: int) -> np.ndarray:
  """Pack index of each item: len(weights) / packs items per pack, heaviest item first
  onto the lightest pack with room (ties: lower pack). Deterministic."""
  weights = np.asarray(weights, np.float64)
  per_pack = len(weights) // packs
  if per_pack * packs != len(weights):
    raise ValueError(f"{len(weights)} items do not split into {packs} equal packs")
  pack_of = np.empty(len(weights), np.int64)
  load = np.zeros(packs)
  room = np.full(packs, per_pack)
  for item in np.argsort(-weights, kind="stable"):
    pack = int(np.argmin(np.where(room > 0, load, np.inf)))
    pack_of[item] = pack
    load[pack] += weights[item]
    room[pack] -= 1
  return pack_of


def eplb_placement(load_E, mesh_shape, num_groups: int | None = None) -> np.ndarray:
  """int32 [E] slot -> logical expert, EPLB's hierarchical packing of `load_E`.

  num_groups: expert groups kept on one node (None: E, one expert per group); must
  divide E and be a multiple of the node count.
  """
  shape = mesh_shape if isinstance(mesh_shape, MeshShape) else MeshShape(*mesh_shape)
  load_E = np.asarray(load_E, np.float64)
  num_experts = load_E.shape[0]
  check_experts_fit(num_experts, shape)
  num_groups = num_experts if num_groups is None else num_groups
  if (num_groups < 1 or num_experts % num_groups or num_groups % shape.nodes):
    raise ConfigError(f"num_groups={num_groups} is invalid: must divide the {num_experts} "
                      f"experts and be a multiple of the {shape.nodes} nodes")
  group_E = np.arange(num_experts) // (num_experts // num_groups)
  node_of_group = balanced_packing(np.bincount(group_E, weights=load_E), shape.nodes)
  node_E = node_of_group[group_E]
  device_E = np.empty(num_experts, np.int64)
  for node in range(shape.nodes):
    members = np.flatnonzero(node_E == node)  # ascending ids
    device_E[members] = node * shape.local + balanced_packing(load_E[members], shape.local)
  # Slots device by device; inside a device ascending logical id (a stable sort).
  return np.argsort(device_E, kind="stable").astype(np.int32)
