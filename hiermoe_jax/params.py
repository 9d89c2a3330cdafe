"""Parameter layout, initialisation and sharding of an MoE block.

params = {
  "router":  {"kernel": [D, E]}                      logical expert order, replicated
  "experts": {"gate": [E, D, F], "up": [E, D, F],    physical slot order, sharded
              "down": [E, F, D]}                      over config.expert_axes on dim 0
  "shared":  {"gate": [D, S], "up": [D, S], "down": [S, D]}     (if n_shared_experts)
  "shared_gate": {"kernel": [D, 1]}                              (if shared_gate)
}
The DeepSeek selection bias is not a parameter (no gradient, no weight decay):
it is separate state from `init_router_bias`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from hiermoe_jax import mesh as mesh_lib
from hiermoe_jax.config import MoEConfig
from hiermoe_jax.validate import validate_for_mesh


def param_shapes(config: MoEConfig) -> dict:
  d, f, e, s = config.d_model, config.d_ff, config.num_experts, config.shared_width
  shapes = {
      "router": {"kernel": (d, e)},
      "experts": {"gate": (e, d, f), "up": (e, d, f), "down": (e, f, d)},
  }
  if s:
    shapes["shared"] = {"gate": (d, s), "up": (d, s), "down": (s, d)}
  if config.shared_gate:
    shapes["shared_gate"] = {"kernel": (d, 1)}
  return shapes


# The FFN-width dim of each expert stack, split over MoEConfig.tensor_axis if set.
_WIDTH_DIM = {"gate": 2, "up": 2, "down": 1}


def param_specs(config: MoEConfig) -> dict:
  """PartitionSpecs matching `param_shapes`: expert stacks split over the expert
  axes (and their FFN width over the tensor axis), the rest replicated."""
  shape = mesh_lib.MeshShape(1, 1, config.expert_axes, tensor_axis=config.tensor_axis)

  def spec(path, dims):
    if path[0].key == "experts":
      return shape.expert_rows(len(dims), _WIDTH_DIM[path[1].key])
    return mesh_lib.replicated()
  return jax.tree_util.tree_map_with_path(spec, param_shapes(config),
                                          is_leaf=lambda x: isinstance(x, tuple))


def _fan_in(path, shape) -> int:
  # Expert stacks are [E, in, out]; dense kernels are [in, out].
  return shape[1] if path[0].key == "experts" else shape[0]


def initializer(fan_in: int):
  """Truncated normal (+-2 std) with std 1/sqrt(fan_in): f(key, shape, dtype)."""
  def init(key, shape, dtype=jnp.float32):
    value = jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) / jnp.sqrt(fan_in)
    return value.astype(dtype)
  return init


def init_params_unsharded(key, config: MoEConfig) -> dict:
  """Initialises every leaf of `param_shapes` in `param_dtype`."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
      param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(leaves))
  dtype = jnp.dtype(config.param_dtype)
  values = [initializer(_fan_in(path, shape))(k, shape, dtype)
            for k, (path, shape) in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(treedef, values)


def param_shardings(config: MoEConfig, mesh: Mesh) -> dict:
  """NamedShardings matching `param_shapes` on `mesh`."""
  return jax.tree.map(lambda s: mesh_lib.named(mesh, s), param_specs(config))


def init_params(key, config: MoEConfig, mesh: Mesh) -> dict:
  """Initialises params directly into their shardings (no full copy on one device)."""
  validate_for_mesh(config, mesh)
  return jax.jit(init_params_unsharded, static_argnums=1,
                 out_shardings=param_shardings(config, mesh))(key, config)


def init_router_bias(config: MoEConfig) -> jax.Array:
  """The DeepSeek-V3 selection bias (`e_score_correction_bias`), logical order."""
  return jnp.zeros((config.num_experts,), jnp.float32)


def identity_placement(config: MoEConfig) -> jax.Array:
  """placement[slot] = logical expert held in that physical slot."""
  return jnp.arange(config.num_experts, dtype=jnp.int32)


# What each dimension of a leaf is, for error messages.
_DIMS = {
    ("router", "kernel"): "[d_model, num_experts]",
    ("experts", "gate"): "[num_experts, d_model, d_ff]",
    ("experts", "up"): "[num_experts, d_model, d_ff]",
    ("experts", "down"): "[num_experts, d_ff, d_model]",
    ("shared", "gate"): "[d_model, n_shared_experts * shared_d_ff]",
    ("shared", "up"): "[d_model, n_shared_experts * shared_d_ff]",
    ("shared", "down"): "[n_shared_experts * shared_d_ff, d_model]",
    ("shared_gate", "kernel"): "[d_model, 1]",
}
# The config fields that make an optional group present.
_NEEDS = {"shared": "n_shared_experts >= 1", "shared_gate": "shared_gate=True"}


def _sizes(config: MoEConfig) -> str:
  return (f"MoEConfig(d_model={config.d_model}, d_ff={config.d_ff}, "
          f"num_experts={config.num_experts}, shared width={config.shared_width})")


def check_params(params, config: MoEConfig, name: str = "params") -> None:
  """Params match `param_shapes(config)`: the same entries, each of its shape.

  Params built for another config (another d_ff, expert count, shared experts)
  would otherwise fail deep inside the block with an XLA shape error, or not at
  all. Shapes are static, so this also runs under jit.
  """
  if not hasattr(params, "keys"):
    raise TypeError(f"{name} is a {type(params).__name__}; expected a dict of arrays as "
                    "init_params or convert.from_hf return")
  expected = param_shapes(config)
  for group in params.keys():
    if group not in expected:
      why = f" (set {_NEEDS[group]})" if group in _NEEDS else ""
      raise ValueError(f"{name} has an entry {group!r} that {_sizes(config)} does not "
                       f"use{why}; expected entries {sorted(expected)}")
  for group, leaves in expected.items():
    if group not in params:
      why = f" ({_NEEDS[group]})" if group in _NEEDS else ""
      raise ValueError(f"{name} has no entry {group!r}, which this MoEConfig needs{why}")
    if not hasattr(params[group], "keys") or set(params[group].keys()) != set(leaves):
      got = sorted(params[group].keys()) if hasattr(params[group], "keys") else params[group]
      raise ValueError(f"{name}[{group!r}] has entries {got!r}; expected {sorted(leaves)}")
    for leaf, shape in leaves.items():
      actual = tuple(jnp.shape(params[group][leaf]))
      if actual != shape:
        raise ValueError(f"{name}[{group!r}][{leaf!r}] has shape {actual}, expected {shape} = "
                         f"{_DIMS[group, leaf]} for {_sizes(config)}")


def check_router_bias(router_bias, config: MoEConfig, name: str = "router_bias") -> None:
  """None, or a real array [num_experts] (logical order; a list too). Runs under jit."""
  if router_bias is None:
    return
  if not hasattr(router_bias, "dtype"):  # a list: jnp.shape refuses those
    router_bias = np.asarray(router_bias)
  shape, dtype = tuple(router_bias.shape), router_bias.dtype
  real = jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
  if shape != (config.num_experts,) or not real:
    raise ValueError(f"{name} has shape {shape} and dtype {dtype}, expected shape "
                     f"({config.num_experts},) = [num_experts] and a real dtype (the "
                     "DeepSeek-V3 selection bias, logical expert order)")
