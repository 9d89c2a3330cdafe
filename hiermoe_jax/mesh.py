"""The device mesh, its expert-parallel hierarchy and the PartitionSpecs this library uses.

The default mesh has axes ("node", "local"), slowest link first: `node` is a host
(or any slow-link group), `local` the devices sharing a fast link. A block may use
other axis names (`MoEConfig.expert_axes`); `MeshShape` carries them. All
PartitionSpecs come from here, so the sharding convention lives in one place.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from hiermoe_jax.errors import ConfigError, is_int

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
  """The expert-parallel hierarchy of a mesh: the one place that owns its sharding.

  `axes` are the mesh axes the experts are split over, slowest link first:
  ("node", "local") by default, any names the user's mesh has, or one axis (then
  `nodes` is 1). Device (n, l) of the hierarchy has linear index n * local + l;
  expert slots are laid out in that order. A mesh may have more axes:
  `batch_axes` split the tokens further (each group of the hierarchy exchanges its
  own tokens; the experts are replicated over them) and `tensor_axis` splits each
  expert's FFN width (expert tensor parallelism; the tokens are replicated over
  it). Hashable and jit-static; host code (traffic statistics, cost model, swap
  search) builds it from numbers alone.
  """
  nodes: int
  local: int
  axes: tuple[str, ...] = AXES
  batch_axes: tuple[str, ...] = ()
  tensor_axis: str | None = None
  batch: int = 1  # devices along batch_axes
  tensor: int = 1  # devices along tensor_axis

  @property
  def devices(self) -> int:
    """Devices of the expert hierarchy (the peers of a flat all-to-all)."""
    return self.nodes * self.local

  @classmethod
  def of(cls, mesh: Mesh, axes=AXES, *, tensor_axis: str | None = None,
         batch_axes=None) -> "MeshShape":
    """batch_axes=None: every mesh axis that is neither an expert nor the tensor axis."""
    axes = check_expert_axes(axes)
    names = tuple(mesh.axis_names)
    missing = [a for a in axes + ((tensor_axis,) if tensor_axis else ()) if a not in names]
    if missing:
      raise ConfigError(f"expert_axes={axes}, tensor_axis={tensor_axis!r} are invalid for a "
                        f"mesh with axes {names}: {missing} not in the mesh")
    if tensor_axis in axes:
      raise ConfigError(f"tensor_axis={tensor_axis!r} is invalid: it is one of the "
                        f"expert_axes={axes}")
    if batch_axes is None:
      batch_axes = tuple(n for n in names if n not in axes and n != tensor_axis)
    batch_axes = tuple(batch_axes)
    if any(a not in names or a in axes or a == tensor_axis for a in batch_axes):
      raise ConfigError(f"batch_axes={batch_axes} is invalid for a mesh with axes {names}: "
                        "must be mesh axes that are neither expert axes nor the tensor axis")
    sizes = [mesh.shape[name] for name in axes]
    return cls(nodes=sizes[0] if len(axes) == 2 else 1, local=sizes[-1], axes=axes,
               batch_axes=batch_axes, tensor_axis=tensor_axis,
               batch=math.prod(mesh.shape[a] for a in batch_axes),
               tensor=mesh.shape[tensor_axis] if tensor_axis else 1)

  @property
  def token_axes(self) -> tuple[str, ...]:
    """Axes the tokens are split over: the batch axes, then the expert hierarchy."""
    return self.batch_axes + self.axes

  def tier_axes(self, tier: str) -> tuple[str, ...]:
    """Mesh axes a hop over `tier` crosses; () for "inter" on a one-axis hierarchy."""
    if tier == "flat":
      return self.axes
    if tier == "inter":
      return self.axes[:1] if len(self.axes) == 2 else ()
    return self.axes[-1:]

  def index(self, tier: str):
    """This device's index along `tier`, inside shard_map (0 along no axis)."""
    axes = self.tier_axes(tier)
    return jax.lax.axis_index(axes) if axes else 0

  def rows(self, ndim: int) -> P:
    """Token rows: the leading dim split over `token_axes`."""
    return P(self.token_axes, *([None] * (ndim - 1)))

  def expert_rows(self, ndim: int, tensor_dim: int | None = None) -> P:
    """An expert stack [E, ...]: E split over the hierarchy, `tensor_dim` (the FFN
    width) over the tensor axis."""
    spec = [self.axes] + [None] * (ndim - 1)
    if tensor_dim is not None and self.tensor_axis:
      spec[tensor_dim] = self.tensor_axis
    return P(*spec)


def check_expert_axes(axes) -> tuple[str, ...]:
  """One or two distinct mesh axis names, slowest first."""
  if isinstance(axes, str) or not isinstance(axes, (tuple, list)):
    axes = (axes,)
  axes = tuple(axes)
  if not 1 <= len(axes) <= 2 or len(set(axes)) != len(axes) or not all(
      isinstance(a, str) and a for a in axes):
    raise ConfigError(f"expert_axes={axes!r} is invalid: must be one or two distinct mesh "
                      "axis names, slowest link first, e.g. ('node', 'local') or ('expert',)")
  return axes


def sharded_rows(ndim: int, axes=AXES) -> P:
  """Leading dim split over the expert devices (expert stacks, token batches)."""
  return P(tuple(axes), *([None] * (ndim - 1)))


def replicated() -> P:
  return P()


def named(mesh: Mesh, spec: P) -> NamedSharding:
  return NamedSharding(mesh, spec)
