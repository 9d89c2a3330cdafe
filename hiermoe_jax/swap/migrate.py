"""Applies a new placement to expert stacks and their optimizer state, point to point.

`migrate(tree, old_placement, new_placement, mesh)` returns `tree` with every
expert leaf re-ordered so that slot s holds logical expert new_placement[s]; all
other leaves are returned unchanged. Only the slices of moved experts travel:
inside `jax.shard_map`, each device reads the slices it must send from its own
shard and `jax.lax.ppermute` delivers them. Moves are packed into rounds in
which every device sends at most one slice and receives at most one (a pairwise
swap of slots on devices a and b is one round: a -> b and b -> a), and each
round is one `ppermute` of all expert leaves together. Moves between slots of
the same device are a local gather. No device ever holds more than its own
shard plus one slice per leaf in flight: there is no all-gather.

Which leaves are expert leaves (`is_expert_leaf`, default `expert_leaf`): a leaf
whose path has a key named "experts" (params["experts"], and the same subtree
inside optax states such as ScaleByAdamState.mu / .nu) and whose leading dim is
E. Such a leaf must be sharded as `mesh.sharded_rows` over ("node", "local") -
the layout of `params.param_specs` - otherwise `migrate` raises rather than let
XLA reshard (which could gather the stack).

`migrate_many(tree, moves, mesh)` applies several placement changes at once, each
to its own leaves (one per layer, say), in one program.

Placements are host values (numpy or concrete arrays): they fix the static
communication pattern, and one program is compiled per distinct move pattern.
The expert leaves are donated when `migrate` runs outside jit; it also traces
inside an outer jit (then the caller decides donation).

All or nothing: every check (placements, leaf shapes and shardings) runs on the
host first, then a single jitted call moves every selected leaf. Donation happens
only when that call's program is dispatched, after tracing and compiling, so any
error raised before it leaves `tree` valid and untouched; once dispatched, the
program runs to completion and the result is the whole new state. What remains is
a failure of the running program itself (a dead peer, a device error): the inputs
are then consumed (`is_deleted()`), as for any failed step that donates its state,
and the run resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from hiermoe_jax import mesh as mesh_lib
from hiermoe_jax.mesh import MeshShape
from hiermoe_jax.validate import check_experts_fit, check_placement

EXPERTS_KEY = "experts"


def _key_name(entry) -> str | None:
  for attr in ("key", "name"):  # DictKey.key, GetAttrKey.name
    value = getattr(entry, attr, None)
    if isinstance(value, str):
      return value
  return None


def expert_leaf(path, leaf, num_experts: int) -> bool:
  """Default predicate: under a key named "experts" and leading dim == E."""
  return (any(_key_name(entry) == EXPERTS_KEY for entry in path)
          and getattr(leaf, "ndim", 0) >= 1 and leaf.shape[0] == num_experts)


@dataclasses.dataclass(frozen=True)
class MovePlan:
  """Static communication pattern of one placement change (hashable).

  local_src[d][i]: local slot of device d that new local slot i copies (moves
    within a device; identity elsewhere).
  rounds: each round is (perm, send[d], recv[d]): perm = ((src, dst), ...)
    device pairs; device d sends its old local slot send[d] and writes what it
    receives into local slot recv[d] (-1: not sending / not receiving).
  """
  per_device: int
  local_src: tuple[tuple[int, ...], ...]
  rounds: tuple[tuple[tuple[tuple[int, int], ...], tuple[int, ...], tuple[int, ...]], ...]
  axes: tuple[str, ...] = mesh_lib.AXES  # the expert hierarchy's mesh axes

  @property
  def moved_slots(self) -> int:
    local = sum(int(i != s) for row in self.local_src for i, s in enumerate(row))
    return local + sum(len(perm) for perm, _, _ in self.rounds)


def plan_moves(old_placement, new_placement, shape: MeshShape) -> MovePlan:
  """Which slice goes where: new slot s takes the old slot holding new[s]."""
  old = _concrete(old_placement, "old_placement")
  new = _concrete(new_placement, "new_placement")
  if old.shape != new.shape:
    raise ValueError(f"old_placement has shape {old.shape} but new_placement has {new.shape}")
  num_experts = old.shape[0]
  check_experts_fit(num_experts, shape)
  per_device = num_experts // shape.devices
  src_slot = np.argsort(old)[new]  # new slot s <- old slot src_slot[s]
  local_src = [list(range(per_device)) for _ in range(shape.devices)]
  moves = []  # (src device, src local, dst device, dst local)
  for dst, src in enumerate(src_slot.tolist()):
    if src == dst:
      continue
    sd, si, dd, di = src // per_device, src % per_device, dst // per_device, dst % per_device
    if sd == dd:
      local_src[dd][di] = si
    else:
      moves.append((sd, si, dd, di))
  # Greedy edge colouring: a round has each device as sender once and receiver once.
  rounds: list[dict] = []
  for sd, si, dd, di in moves:
    for r in rounds:
      if sd not in r["send"] and dd not in r["recv"]:
        break
    else:
      r = {"send": {}, "recv": {}, "perm": []}
      rounds.append(r)
    r["send"][sd], r["recv"][dd] = si, di
    r["perm"].append((sd, dd))
  packed = tuple(
      (tuple(r["perm"]),
       tuple(r["send"].get(d, -1) for d in range(shape.devices)),
       tuple(r["recv"].get(d, -1) for d in range(shape.devices)))
      for r in rounds)
  return MovePlan(per_device, tuple(map(tuple, local_src)), packed, shape.axes)


def _device_migrate(leaves, *, plan: MovePlan):
  """Per-device body: local gather, then one ppermute per round for all leaves."""
  me = jax.lax.axis_index(plan.axes)
  identity = tuple(range(plan.per_device))
  new = list(leaves)
  if any(row != identity for row in plan.local_src):
    src_idx = jnp.asarray(plan.local_src, jnp.int32)[me]
    new = [jnp.take(x, src_idx, axis=0) for x in leaves]
  for perm, send, recv in plan.rounds:
    send_idx = jnp.maximum(jnp.asarray(send, jnp.int32)[me], 0)
    recv_idx = jnp.asarray(recv, jnp.int32)[me]
    outgoing = [jax.lax.dynamic_index_in_dim(x, send_idx, 0) for x in leaves]
    incoming = jax.lax.ppermute(outgoing, plan.axes, perm)
    at = jnp.maximum(recv_idx, 0)
    new = [jax.lax.dynamic_update_index_in_dim(
        x, jnp.where(recv_idx >= 0, y, jax.lax.dynamic_index_in_dim(x, at, 0)), at, 0)
        for x, y in zip(new, incoming)]
  return new


@functools.lru_cache(maxsize=64)
def _migrate_fn(plan: MovePlan, mesh: Mesh, ndims: tuple[int, ...]):
  specs = [mesh_lib.sharded_rows(n, plan.axes) for n in ndims]
  return jax.shard_map(functools.partial(_device_migrate, plan=plan), mesh=mesh,
                       in_specs=(specs,), out_specs=specs)


GroupKey = tuple[tuple[MovePlan, tuple[int, ...]], ...]  # (plan, leaf ndims) per group


def _groups_fn(key: GroupKey, mesh: Mesh):
  fns = [_migrate_fn(plan, mesh, ndims) for plan, ndims in key]
  return lambda groups: [fn(leaves) for fn, leaves in zip(fns, groups)]


@functools.lru_cache(maxsize=64)
def _jitted(key: GroupKey, mesh: Mesh):
  return jax.jit(_groups_fn(key, mesh), donate_argnums=0)


def migrate(tree, old_placement, new_placement, mesh: Mesh, *,
            is_expert_leaf: Callable | None = None, expert_axes=mesh_lib.AXES):
  """`tree` with every expert leaf moved from `old_placement` to `new_placement`.

  tree: any pytree, e.g. params, an optax state, or (params, opt_state).
  is_expert_leaf(path, leaf) -> bool selects the leaves to move; default
    `expert_leaf(path, leaf, E)` (see the module docstring).
  expert_axes: the mesh axes the expert stacks are split over (MoEConfig.expert_axes).
  Outside jit, the expert leaves are donated: do not use them afterwards.
  """
  return migrate_many(tree, [(old_placement, new_placement, is_expert_leaf)], mesh,
                      expert_axes=expert_axes)


def migrate_many(tree, moves, mesh: Mesh, *, expert_axes=mesh_lib.AXES):
  """`tree` with several placement changes applied together, all or nothing.

  moves: (old_placement, new_placement, is_expert_leaf or None) per change, as in
    `migrate`; no leaf may be selected by two of them.
  Every check runs before anything moves, then one jitted call moves every
  selected leaf (see "All or nothing" in the module docstring). Outside jit, the
  moved leaves are donated: do not use them afterwards.
  """
  shape = MeshShape.of(mesh, expert_axes)
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  owner: dict[int, int] = {}  # leaf index -> the move that selected it
  groups = []  # (plan, E, leaf indices)
  for m, (old_placement, new_placement, select) in enumerate(moves):
    old = _concrete(old_placement, "old_placement")
    num_experts = old.shape[0]
    select = select or functools.partial(_default_select, num_experts=num_experts)
    plan = plan_moves(old, new_placement, shape)
    chosen = [n for n, (path, leaf) in enumerate(flat) if select(path, leaf)]
    for n in chosen:
      if n in owner:
        raise ValueError(f"leaf {jax.tree_util.keystr(flat[n][0])} is selected by moves "
                         f"{owner[n]} and {m}; each leaf can follow one placement change")
      owner[n] = m
    if chosen and plan.moved_slots:
      groups.append((plan, num_experts, chosen))
  if not groups:
    return tree
  tracing = any(isinstance(flat[n][1], jax.core.Tracer) for _, _, chosen in groups
                for n in chosen)
  for _, num_experts, chosen in groups:
    for n in chosen:
      _check_leaf(flat[n][0], flat[n][1], mesh, shape, num_experts, tracing)
  leaves = [[flat[n][1] for n in chosen] for _, _, chosen in groups]
  key = tuple((plan, tuple(x.ndim for x in group)) for (plan, _, _), group in zip(groups, leaves))
  fn = _groups_fn(key, mesh) if tracing else _jitted(key, mesh)
  moved = fn(leaves)  # the one call that may consume (donate) the inputs
  values = [leaf for _, leaf in flat]
  for (_, _, chosen), group in zip(groups, moved):
    for n, value in zip(chosen, group):
      values[n] = value
  return jax.tree_util.tree_unflatten(treedef, values)


def _default_select(path, leaf, *, num_experts: int) -> bool:
  return expert_leaf(path, leaf, num_experts)


def _check_leaf(path, leaf, mesh: Mesh, shape: MeshShape, num_experts: int,
                tracing: bool) -> None:
  name = jax.tree_util.keystr(path)
  if getattr(leaf, "ndim", 0) < 1 or leaf.shape[0] != num_experts:
    raise ValueError(f"expert leaf {name} has shape {getattr(leaf, 'shape', None)}; its "
                     f"leading dim must be num_experts={num_experts}")
  if tracing or not isinstance(leaf, jax.Array):
    return
  want = mesh_lib.named(mesh, shape.rows(leaf.ndim))
  if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
    raise ValueError(f"expert leaf {name} has sharding {leaf.sharding}; migrate needs "
                     f"{want.spec} on this mesh (params.param_specs), so that no device "
                     "gathers the expert stack")


def _concrete(placement, name: str) -> np.ndarray:
  if isinstance(placement, jax.core.Tracer):
    raise ValueError(f"{name} is a tracer; migrate needs host placements (the move "
                     "pattern is static). Call it outside jit, or pass numpy placements")
  values = np.asarray(placement)
  return check_placement(values, name=name).astype(np.int64)
