"""Applies a new placement to expert stacks and their optimizer state, point to point.

`migrate(tree, old_placement, new_placement, mesh)` returns `tree` with every
expert leaf re-ordered so that slot s holds logical expert new_placement[s]; all
other leaves are returned unchanged. Only the slices of moved experts travel:
inside `jax.shard_map`, each device reads the slices it must send from its own
shard and `jax.lax.ppermute` delivers them. No all-gather.

Compile once: the move pattern is data, not a static argument. `move_tables`
turns a placement change into int32 tables (which old local row each new local
row copies; per device pair, which rows each side sends and where the other side
writes them), and one program per tree signature (leaf shapes, dtypes,
shardings) serves every decision. The program has one loop per unordered device
pair (a, b): a `jax.lax.fori_loop` whose trip count is the number of slices the
pair exchanges (a table entry, 0 for most pairs), each iteration one `ppermute`
of ((a, b), (b, a)) moving one slice of every leaf of the group. A pairwise swap
of slots on a and b is one iteration; no device outside the pair sends anything.
Moves between slots of one device are a local gather. A device holds its old
shard, its new shard and one slice per leaf in flight. The tables hold up to
every row of a device, so no decision exceeds the program: any placement change
runs in one call. The program has D * (D - 1) / 2 loops per group (D expert
devices): 28 on 8 devices, 2016 on 64.

Which leaves are expert leaves (`is_expert_leaf`, default `expert_leaf`): a leaf
whose path has a key named "experts" (params["experts"], and the same subtree
inside optax states such as ScaleByAdamState.mu / .nu) and whose leading dim is
E; with a [L, E] placement (a scanned stack, row l follows placement[l]), leaves
[L, E, ...]. Such a leaf must be sharded as `mesh.sharded_rows` over ("node",
"local") - the layout of `params.param_specs` - ([L, E, ...]: the E dim, the
leading dim replicated), otherwise `migrate` raises rather than let XLA reshard
(which could gather the stack).

`migrate_many(tree, moves, mesh)` applies several placement changes at once, each
to its own leaves (one per layer, say), in one program. Pass every layer on every
decision (identity for the unchanged ones) to keep one program for all decisions.
`stats` counts compilations and their seconds (`MigrationStats`).

Placements are host values (numpy or concrete arrays). The expert leaves are
donated when `migrate` runs outside jit; it also traces inside an outer jit (then
the caller decides donation).

All or nothing: every check (placements, leaf shapes and shardings) runs on the
host first, then a single compiled call moves every selected leaf. Donation happens
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
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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


def expert_leaf(path, leaf, num_experts: int, layers: int | None = None) -> bool:
  """Default predicate: under a key named "experts" and leading dim == E (with
  `layers`, leading dims == (layers, E): a scanned stack)."""
  lead = (num_experts,) if layers is None else (layers, num_experts)
  return (any(_key_name(entry) == EXPERTS_KEY for entry in path)
          and tuple(getattr(leaf, "shape", ())[:len(lead)]) == lead)


@dataclasses.dataclass
class MigrationStats:
  """Compilations of migration programs in this process (a program per tree signature)."""
  compiles: int = 0
  compile_s: float = 0.0


stats = MigrationStats()


def device_pairs(devices: int) -> list[tuple[int, int]]:
  """The unordered device pairs (a < b), in the order of the program's loops."""
  return [(a, b) for a in range(devices) for b in range(a + 1, devices)]


@dataclasses.dataclass(frozen=True)
class MoveTables:
  """One placement change of a group as data. Rows are a device's local (layer, slot)
  entries flattened, row = layer * per_device + slot.

  local_src [D, R]: new local row i of device d copies old local row local_src[d, i].
  send [Q, R, 2], recv [Q, R, 2]: for device pair q = (a, b) and iteration k, the old
    row side 0 (a) / side 1 (b) sends and the row it writes what it receives into
    (-1: nothing this iteration).
  count [Q]: iterations of pair q.
  moved: slices that change device.
  """
  local_src: np.ndarray
  send: np.ndarray
  recv: np.ndarray
  count: np.ndarray
  moved: int

  def arrays(self) -> tuple[np.ndarray, ...]:
    return self.local_src, self.send, self.recv, self.count


def move_tables(old_placement, new_placement, shape: MeshShape) -> MoveTables:
  """Which slice goes where: new slot s takes the old slot holding new[s] (per layer
  for [L, E] placements)."""
  old = np.atleast_2d(_concrete(old_placement, "old_placement"))
  new = np.atleast_2d(_concrete(new_placement, "new_placement"))
  if old.shape != new.shape:
    raise ValueError(f"old_placement has shape {old.shape} but new_placement has {new.shape}")
  layers, num_experts = old.shape
  check_experts_fit(num_experts, shape)
  per_device, devices = num_experts // shape.devices, shape.devices
  rows = layers * per_device
  pair_index = {pair: q for q, pair in enumerate(device_pairs(devices))}
  local_src = np.tile(np.arange(rows, dtype=np.int32), (devices, 1))
  send = np.zeros((len(pair_index), rows, 2), np.int32)
  recv = np.full((len(pair_index), rows, 2), -1, np.int32)
  sent = np.zeros((len(pair_index), 2), np.int64)  # iterations used per pair and side
  moved = 0
  for layer in range(layers):
    src_slot = np.argsort(old[layer])[new[layer]]  # new slot s <- old slot src_slot[s]
    for dst, src in enumerate(src_slot.tolist()):
      sd, dd = src // per_device, dst // per_device
      si, di = layer * per_device + src % per_device, layer * per_device + dst % per_device
      if sd == dd:
        local_src[dd, di] = si
        continue
      q, side = pair_index[(min(sd, dd), max(sd, dd))], int(sd > dd)
      k = sent[q, side]
      send[q, k, side], recv[q, k, 1 - side] = si, di
      sent[q, side] += 1
      moved += 1
  count = sent.max(axis=1).astype(np.int32)
  return MoveTables(local_src, send, recv, count, moved)


def _device_migrate(leaves, tables, *, axes: tuple[str, ...], devices: int, layered: bool):
  """Per-device body: local gather, then per device pair a loop of `ppermute`s."""
  local_src, send, recv, count = tables
  me = jax.lax.axis_index(axes)
  old = [x.reshape((-1,) + x.shape[2 if layered else 1:]) for x in leaves]  # [rows, ...]
  new = [jnp.take(x, local_src[me], axis=0) for x in old]
  for q, (a, b) in enumerate(device_pairs(devices)):
    side = (me == b).astype(jnp.int32)
    involved = (me == a) | (me == b)

    def exchange(k, new, q=q, a=a, b=b, side=side, involved=involved):
      outgoing = [jax.lax.dynamic_index_in_dim(x, send[q, k, side], 0) for x in old]
      incoming = jax.lax.ppermute(outgoing, axes, ((a, b), (b, a)))
      row = recv[q, k, side]
      at, ok = jnp.maximum(row, 0), involved & (row >= 0)
      return [jax.lax.dynamic_update_index_in_dim(
          x, jnp.where(ok, y, jax.lax.dynamic_index_in_dim(x, at, 0)), at, 0)
          for x, y in zip(new, incoming)]
    new = jax.lax.fori_loop(0, count[q], exchange, new)
  return [y.reshape(x.shape) for x, y in zip(leaves, new)]


def _leaf_spec(ndim: int, layered: bool, axes) -> P:
  return P(None, *mesh_lib.sharded_rows(ndim - 1, axes)) if layered else \
      mesh_lib.sharded_rows(ndim, axes)


GroupKey = tuple[tuple[bool, tuple[int, ...]], ...]  # (layered, leaf ndims) per group


def _program(key: GroupKey, mesh: Mesh, axes: tuple[str, ...]):
  """groups, tables -> moved groups: one shard_map over every group."""
  devices = MeshShape.of(mesh, axes).devices
  leaf_specs = [[_leaf_spec(n, layered, axes) for n in ndims] for layered, ndims in key]
  table_specs = [[P()] * 4 for _ in key]

  def per_device(groups, tables):
    return [_device_migrate(leaves, t, axes=axes, devices=devices, layered=layered)
            for (layered, _), leaves, t in zip(key, groups, tables)]
  return jax.shard_map(per_device, mesh=mesh, in_specs=(leaf_specs, table_specs),
                       out_specs=leaf_specs)


@functools.lru_cache(maxsize=64)
def _compiled(key: GroupKey, mesh: Mesh, axes: tuple[str, ...], signature):
  """The compiled program of one tree signature ((shape, dtype, sharding) per leaf,
  table shapes); counted in `stats`."""
  leaves_sig, tables_sig = signature
  start = time.perf_counter()
  args = ([[jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d, sh in group]
           for group in leaves_sig],
          [[jax.ShapeDtypeStruct(s, np.int32, sharding=NamedSharding(mesh, P()))
            for s in group] for group in tables_sig])
  compiled = jax.jit(_program(key, mesh, axes), donate_argnums=0).lower(*args).compile()
  stats.compiles += 1
  stats.compile_s += time.perf_counter() - start
  return compiled


def _replicated(mesh: Mesh, value: np.ndarray) -> jax.Array:
  """A host table as a replicated global array (every process holds the same)."""
  return jax.make_array_from_callback(value.shape, NamedSharding(mesh, P()),
                                      lambda index: value[index])


def migrate(tree, old_placement, new_placement, mesh: Mesh, *,
            is_expert_leaf: Callable | None = None, expert_axes=mesh_lib.AXES):
  """`tree` with every expert leaf moved from `old_placement` to `new_placement`.

  tree: any pytree, e.g. params, an optax state, or (params, opt_state).
  old_placement, new_placement: [E] slot -> logical expert, or [L, E] for scanned
    stacks [L, E, ...].
  is_expert_leaf(path, leaf) -> bool selects the leaves to move; default
    `expert_leaf` (see the module docstring).
  expert_axes: the mesh axes the expert stacks are split over (MoEConfig.expert_axes).
  Outside jit, the expert leaves are donated: do not use them afterwards.
  """
  return migrate_many(tree, [(old_placement, new_placement, is_expert_leaf)], mesh,
                      expert_axes=expert_axes)


def migrate_many(tree, moves, mesh: Mesh, *, expert_axes=mesh_lib.AXES):
  """`tree` with several placement changes applied together, all or nothing.

  moves: (old_placement, new_placement, is_expert_leaf or None) per change, as in
    `migrate`; no leaf may be selected by two of them.
  Every check runs before anything moves, then one compiled call moves every
  selected leaf (see "All or nothing" in the module docstring); if no change moves
  anything, `tree` is returned as is. Outside jit, the moved leaves are donated: do
  not use them afterwards.
  """
  shape = MeshShape.of(mesh, expert_axes)
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  owner: dict[int, int] = {}  # leaf index -> the move that selected it
  groups = []  # (tables, layered, lead dims, leaf indices)
  for m, (old_placement, new_placement, select) in enumerate(moves):
    old = _concrete(old_placement, "old_placement")
    lead = old.shape
    layered = old.ndim == 2
    select = select or functools.partial(_default_select, lead=lead)
    tables = move_tables(old, new_placement, shape)
    chosen = [n for n, (path, leaf) in enumerate(flat) if select(path, leaf)]
    for n in chosen:
      if n in owner:
        raise ValueError(f"leaf {jax.tree_util.keystr(flat[n][0])} is selected by moves "
                         f"{owner[n]} and {m}; each leaf can follow one placement change")
      owner[n] = m
    if chosen:
      groups.append((tables, layered, lead, chosen))
  if not any(t.moved or np.any(t.local_src != np.arange(t.local_src.shape[1]))
             for t, _, _, _ in groups):
    return tree
  tracing = any(isinstance(flat[n][1], jax.core.Tracer) for *_, chosen in groups
                for n in chosen)
  for _, layered, lead, chosen in groups:
    for n in chosen:
      _check_leaf(flat[n][0], flat[n][1], mesh, shape, lead, tracing)
  leaves = [[flat[n][1] for n in chosen] for *_, chosen in groups]
  key = tuple((layered, tuple(x.ndim for x in group))
              for (_, layered, _, _), group in zip(groups, leaves))
  if tracing:
    tables = [[jnp.asarray(a) for a in t.arrays()] for t, *_ in groups]
    moved = _program(key, mesh, shape.axes)(leaves, tables)
  else:
    signature = (tuple(tuple((x.shape, x.dtype, _canonical(mesh, x, layered, shape.axes))
                             for x in group)
                       for (_, layered, _, _), group in zip(groups, leaves)),
                 tuple(tuple(a.shape for a in t.arrays()) for t, *_ in groups))
    fn = _compiled(key, mesh, shape.axes, signature)
    tables = [[_replicated(mesh, a) for a in t.arrays()] for t, *_ in groups]
    moved = fn(leaves, tables)  # the one call that may consume (donate) the inputs
  values = [leaf for _, leaf in flat]
  for (*_, chosen), group in zip(groups, moved):
    for n, value in zip(chosen, group):
      values[n] = value
  return jax.tree_util.tree_unflatten(treedef, values)


def _canonical(mesh: Mesh, leaf, layered: bool, axes) -> NamedSharding:
  """The layout `_check_leaf` accepted, one spelling for every equivalent sharding (an
  output's spec may be spelled differently from its input's)."""
  return NamedSharding(mesh, _leaf_spec(leaf.ndim, layered, axes))


def _default_select(path, leaf, *, lead: tuple[int, ...]) -> bool:
  return expert_leaf(path, leaf, lead[-1], lead[0] if len(lead) == 2 else None)


def _check_leaf(path, leaf, mesh: Mesh, shape: MeshShape, lead: tuple[int, ...],
                tracing: bool) -> None:
  name = jax.tree_util.keystr(path)
  if tuple(getattr(leaf, "shape", ())[:len(lead)]) != lead or leaf.ndim <= len(lead) - 1:
    what = "num_experts" if len(lead) == 1 else "(layers, num_experts)"
    raise ValueError(f"expert leaf {name} has shape {getattr(leaf, 'shape', None)}; its "
                     f"leading dims must be {what}={lead}")
  if tracing or not isinstance(leaf, jax.Array):
    return
  want = mesh_lib.named(mesh, _leaf_spec(leaf.ndim, len(lead) == 2, shape.axes))
  if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
    raise ValueError(f"expert leaf {name} has sharding {leaf.sharding}; migrate needs "
                     f"{want.spec} on this mesh (params.param_specs), so that no device "
                     "gathers the expert stack")


def _concrete(placement, name: str) -> np.ndarray:
  if isinstance(placement, jax.core.Tracer):
    raise ValueError(f"{name} is a tracer; migrate needs host placements (the tables are "
                     "built on the host). Call it outside jit, or pass numpy placements")
  values = np.asarray(placement)
  if values.ndim == 2:  # [L, E]: one placement per scanned layer
    return np.stack([check_placement(row, name=f"{name}[{l}]").astype(np.int64)
                     for l, row in enumerate(values)])
  return check_placement(values, name=name).astype(np.int64)
