"""Checks of a config, inputs and placement against a concrete mesh."""

from __future__ import annotations

import numpy as np
from jax.sharding import Mesh

from hiermoe_jax.config import ConfigError, MoEConfig
from hiermoe_jax.mesh import MeshShape


def validate_for_mesh(config: MoEConfig, mesh: Mesh) -> MeshShape:
  shape = MeshShape.of(mesh)
  if config.num_experts % shape.devices:
    raise ConfigError(
        f"MoEConfig.num_experts={config.num_experts} is invalid for a {shape.nodes}x"
        f"{shape.local} mesh: it must be a multiple of the device count {shape.devices}")
  return shape


def validate_tokens(num_tokens: int, d_model_in: int, config: MoEConfig, shape: MeshShape):
  if d_model_in != config.d_model:
    raise ValueError(f"moe_apply: x has last dimension {d_model_in}, but "
                     f"MoEConfig.d_model={config.d_model}")
  if num_tokens % shape.devices:
    raise ValueError(f"moe_apply: x has {num_tokens} tokens, which the {shape.devices} devices "
                     f"of the mesh cannot split evenly; use a multiple of {shape.devices}")


def validate_placement(placement, num_experts: int) -> None:
  """A placement must be a permutation of range(num_experts) (checked when concrete)."""
  if placement is None:
    return
  if tuple(placement.shape) != (num_experts,):
    raise ValueError(f"placement has shape {tuple(placement.shape)}; expected ({num_experts},), "
                     "a permutation from physical slot to logical expert")
  try:
    values = np.asarray(placement)
  except Exception:  # a tracer: checked by the caller's own invariants
    return
  if not np.array_equal(np.sort(values), np.arange(num_experts)):
    raise ValueError(f"placement={values.tolist()} is not a permutation of "
                     f"range({num_experts})")
