"""`hiermoe_jax.linen.MoE`: the Flax Linen shell over `moe_apply`.

    layer = hiermoe_jax.linen.MoE(config, mesh)
    variables = layer.init(key, x)                        # or load_hf(layer, state_dict)
    y, state = layer.apply(variables, x, mutable=["intermediates"])
    aux = state["intermediates"]["aux"][0]                # MoEAux

Collections: "params" (partitioned with `nn.with_partitioning`, so Linen's
partitioning utilities see the expert sharding), "router_state" (the DeepSeek
selection bias) and "placement" (physical slot -> logical expert). Every variable
is created on the mesh with its declared sharding (replicated ones too), so a
jitted step gets back the shardings it was given and compiles once.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hiermoe_jax.config import MoEConfig
from hiermoe_jax.convert import from_hf
from hiermoe_jax.moe import moe_apply
from hiermoe_jax.params import (_fan_in, identity_placement, init_router_bias, initializer,
                                param_shapes, param_specs)
from hiermoe_jax.validate import validate_for_mesh


def _placed(init, mesh: Mesh, spec):
  """`init` whose value lands on `mesh` with `spec` (eagerly or under jit)."""
  sharding = NamedSharding(mesh, PartitionSpec(*spec))
  return lambda *args: jax.device_put(init(*args), sharding)


class MoE(nn.Module):
  config: MoEConfig
  mesh: Mesh

  @nn.compact
  def __call__(self, x):
    validate_for_mesh(self.config, self.mesh)  # before any variable is created
    shapes = param_shapes(self.config)
    specs = param_specs(self.config)
    dtype = jnp.dtype(self.config.param_dtype)

    def make(path, shape, spec):
      name = "/".join(k.key for k in path)
      init = nn.with_partitioning(_placed(initializer(_fan_in(path, shape)), self.mesh, spec),
                                  tuple(spec), mesh=self.mesh)
      return self.param(name, init, shape, dtype)

    # Shapes are tuples and PartitionSpecs are tuples: both are leaves here.
    params = jax.tree_util.tree_map_with_path(make, shapes, specs,
                                              is_leaf=lambda s: isinstance(s, tuple))
    bias = self.variable("router_state", "bias",
                         _placed(init_router_bias, self.mesh, ()), self.config)
    placement = self.variable("placement", "placement",
                              _placed(identity_placement, self.mesh, ()), self.config)
    y, aux = moe_apply(params, x, config=self.config, mesh=self.mesh,
                       placement=placement.value, router_bias=bias.value)
    self.sow("intermediates", "aux", aux)
    return y


def _replace_at(tree: Mapping, path: Sequence[str], value) -> dict:
  """A copy of nested `tree` with `tree[path[0]]...[path[-1]] = value`."""
  if not path:
    return value
  tree = dict(tree)
  tree[path[0]] = _replace_at(tree.get(path[0], {}), path[1:], value)
  return tree


def load_hf(module: MoE, state_dict: Mapping[str, Any], *, prefix: str = "",
            variables: Mapping | None = None, path: str | Sequence[str] = ()) -> dict:
  """Linen variables holding one Hugging Face MoE block's weights (`convert.from_hf`),
  each on `module.mesh` with its sharding, boxed as `module.init` boxes them.

  Without `variables`: the block's own {"params", "router_state", "placement"},
  ready for `module.apply`. With `variables` (e.g. a whole model's, from `init`) and
  `path` (the block's scope names, e.g. ("layers_3", "MoE_0") or "layers_3/MoE_0"):
  a copy of them with that block's entries replaced. The placement is the identity
  (the checkpoint's expert order); the selection bias is the checkpoint's, or zero.
  """
  if not isinstance(module, MoE):
    raise TypeError(f"load_hf: module is a {type(module).__name__}; expected a "
                    "hiermoe_jax.linen.MoE (its config and mesh say what to load)")
  config, mesh = module.config, module.mesh
  validate_for_mesh(config, mesh)
  params, bias = from_hf(state_dict, config, prefix=prefix, mesh=mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  boxed = {}
  for group, leaves in params.items():
    for leaf, value in leaves.items():
      spec = param_specs(config)[group][leaf]
      boxed[f"{group}/{leaf}"] = nn.Partitioned(value, names=tuple(spec), mesh=mesh)
  own = {
      "params": boxed,
      "router_state": {"bias": jax.device_put(
          init_router_bias(config) if bias is None else bias, replicated)},
      "placement": {"placement": jax.device_put(identity_placement(config), replicated)},
  }
  if variables is None:
    return own
  path = tuple(path.split("/")) if isinstance(path, str) else tuple(path)
  if not path:
    raise ValueError("load_hf: path=() is invalid with variables: name the block's scope, "
                     "e.g. path=('layers_3', 'MoE_0')")
  out = dict(variables)
  for collection, entries in own.items():
    out[collection] = _replace_at(out.get(collection, {}), path, entries)
  return out
