"""Checks of a config, inputs and placements against a concrete mesh.

Each rule lives here once: "experts divide the devices" (`check_experts_fit`) and
"a placement is a permutation" (`check_placement`) serve the block, the swap
search and migration, the traffic statistics and the command lines alike.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from hiermoe_jax.config import MoEConfig
from hiermoe_jax.errors import ConfigError
from hiermoe_jax.mesh import MeshShape


def check_experts_fit(num_experts: int, shape: MeshShape, name: str = "num_experts") -> None:
  """Experts spread evenly over the devices of the expert hierarchy."""
  if num_experts % shape.devices:
    raise ConfigError(f"{name}={num_experts} is invalid: must be a multiple of the "
                      f"{shape.devices} devices of the {shape.nodes}x{shape.local} mesh")


def shape_of(config: MoEConfig, mesh: Mesh) -> MeshShape:
  """The block's view of `mesh`: its expert hierarchy, batch axes and tensor axis."""
  try:
    return MeshShape.of(mesh, config.expert_axes, tensor_axis=config.tensor_axis,
                        batch_axes=config.batch_axes)
  except ConfigError as e:
    raise ConfigError(f"MoEConfig: {e}") from None


def validate_for_mesh(config: MoEConfig, mesh: Mesh) -> MeshShape:
  shape = shape_of(config, mesh)
  check_experts_fit(config.num_experts, shape, "MoEConfig.num_experts")
  if config.d_ff % shape.tensor:
    raise ConfigError(f"MoEConfig.d_ff={config.d_ff} is invalid: must be a multiple of the "
                      f"{shape.tensor} devices of tensor_axis={config.tensor_axis!r}")
  return shape


def validate_tokens(num_tokens: int, d_model_in: int, config: MoEConfig, shape: MeshShape):
  if d_model_in != config.d_model:
    raise ValueError(f"moe_apply: x has last dimension {d_model_in}, but "
                     f"MoEConfig.d_model={config.d_model}")
  splits = shape.batch * shape.devices
  if num_tokens % splits:
    raise ValueError(f"moe_apply: x has {num_tokens} tokens, which the {splits} devices "
                     f"of the mesh cannot split evenly; use a multiple of {splits}")
  if num_tokens // splits % config.overlap_chunks:
    raise ValueError(f"moe_apply: x has {num_tokens // splits} tokens per device, which "
                     f"MoEConfig.overlap_chunks={config.overlap_chunks} cannot split evenly; use "
                     f"a multiple of {splits * config.overlap_chunks} tokens")


def check_placement(placement, num_experts: int | None = None, name: str = "placement"):
  """A placement maps physical slot -> logical expert: a permutation of range(E).

  Accepts a list or any integer array; returns it as an int32 array.
  num_experts=None takes E from a one-dimensional placement. A traced placement
  cannot be checked here and is returned as it is.
  """
  if num_experts is None:
    num_experts = np.shape(placement)[0] if np.ndim(placement) == 1 else -1
  if isinstance(placement, jax.core.Tracer):
    if placement.shape != (num_experts,) or not np.issubdtype(placement.dtype, np.integer):
      raise ValueError(f"{name} has shape {placement.shape} and dtype {placement.dtype}; "
                       f"expected an integer array of shape ({num_experts},)")
    return placement.astype(np.int32)
  values = np.asarray(placement)
  if values.shape != (num_experts,) or not (
      np.issubdtype(values.dtype, np.integer) or values.size == 0):
    raise ValueError(f"{name} has shape {values.shape} and dtype {values.dtype}; expected an "
                     f"integer array of shape ({num_experts},), a permutation from physical "
                     "slot to logical expert")
  if not np.array_equal(np.sort(values), np.arange(num_experts)):
    raise ValueError(f"{name}={values.tolist()} is invalid: not a permutation of "
                     f"range({num_experts}), a map from physical slot to logical expert")
  if isinstance(placement, jax.Array):  # keep it on its devices
    return placement.astype(np.int32)
  return values.astype(np.int32)
