"""The ("node", "local") device mesh and the PartitionSpecs this library uses.

Axes are ordered slowest link first: `node` is a host (or any slow-link group),
`local` the devices sharing a fast link. Device (n, l) has linear index
n * local + l; expert slots and token shards are laid out in that order.
All PartitionSpecs come from here, so the sharding convention lives in one place.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from hiermoe_jax.config import ConfigError, is_int

NODE = "node"
LOCAL = "local"
AXES = (NODE, LOCAL)


def make_mesh(nodes: int | None = None, local: int | None = None, *, devices=None) -> Mesh:
  """Builds the 2D ("node", "local") mesh over all devices.

  Defaults: nodes = jax.process_count(), local = jax.local_device_count(). Either
  may be overridden (e.g. 2x4 on 8 CPU devices in one process); the product must
  equal the number of devices.
  """
  devices = jax.devices() if devices is None else list(devices)
  for name, value in (("nodes", nodes), ("local", local)):
    if value is not None and (not is_int(value) or value < 1):
      raise ConfigError(f"make_mesh: {name}={value!r} is invalid: must be None or an "
                        "integer >= 1")
  if nodes is None and local is None:
    nodes, local = jax.process_count(), jax.local_device_count()
  elif nodes is None:
    nodes = len(devices) // local if local and len(devices) % local == 0 else -1
  elif local is None:
    local = len(devices) // nodes if nodes and len(devices) % nodes == 0 else -1
  for name, value in (("nodes", nodes), ("local", local)):
    if not is_int(value) or value < 1:
      raise ConfigError(f"make_mesh: {name}={value!r} is invalid for {len(devices)} devices; "
                        f"nodes * local must equal {len(devices)}")
  if nodes * local != len(devices):
    raise ConfigError(f"make_mesh: nodes={nodes} x local={local} = {nodes * local} devices, "
                      f"but there are {len(devices)}; nodes * local must equal {len(devices)}")
  return jax.make_mesh((nodes, local), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


@dataclasses.dataclass(frozen=True)
class MeshShape:
  """Static facts about a mesh that dispatch code needs (hashable, jit-static)."""
  nodes: int
  local: int

  @property
  def devices(self) -> int:
    return self.nodes * self.local

  @classmethod
  def of(cls, mesh: Mesh) -> "MeshShape":
    if tuple(mesh.axis_names) != AXES:
      raise ValueError(f"mesh axis_names={tuple(mesh.axis_names)} are invalid: "
                       f"hiermoe_jax needs a mesh with axes {AXES} (see make_mesh)")
    return cls(nodes=mesh.shape[NODE], local=mesh.shape[LOCAL])


def sharded_rows(ndim: int) -> P:
  """Leading dim split over all devices (expert stacks, token batches)."""
  return P(AXES, *([None] * (ndim - 1)))


def replicated() -> P:
  return P()


def named(mesh: Mesh, spec: P) -> NamedSharding:
  return NamedSharding(mesh, spec)
