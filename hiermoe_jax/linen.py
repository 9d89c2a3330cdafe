"""`hiermoe_jax.linen.MoE`: the Flax Linen shell over `moe_apply`.

    layer = hiermoe_jax.linen.MoE(config, mesh)
    variables = layer.init(key, x)
    y, state = layer.apply(variables, x, mutable=["intermediates"])
    aux = state["intermediates"]["aux"][0]                # MoEAux

Collections: "params" (partitioned with `nn.with_partitioning`, so Linen's
partitioning utilities see the expert sharding), "router_state" (the DeepSeek
selection bias) and "placement" (physical slot -> logical expert).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from hiermoe_jax.config import MoEConfig
from hiermoe_jax.moe import moe_apply
from hiermoe_jax.params import _fan_in, initializer, param_shapes, param_specs


class MoE(nn.Module):
  config: MoEConfig
  mesh: Mesh

  @nn.compact
  def __call__(self, x):
    shapes = param_shapes(self.config)
    specs = param_specs(self.config)
    dtype = jnp.dtype(self.config.param_dtype)

    def make(path, shape, spec):
      name = "/".join(k.key for k in path)
      init = nn.with_partitioning(initializer(_fan_in(path, shape)), tuple(spec),
                                  mesh=self.mesh)
      return self.param(name, init, shape, dtype)

    # Shapes are tuples and PartitionSpecs are tuples: both are leaves here.
    params = jax.tree_util.tree_map_with_path(make, shapes, specs,
                                              is_leaf=lambda s: isinstance(s, tuple))
    bias = self.variable("router_state", "bias", jnp.zeros, (self.config.num_experts,),
                         jnp.float32)
    placement = self.variable("placement", "placement", jnp.arange, self.config.num_experts,
                              dtype=jnp.int32)
    y, aux = moe_apply(params, x, config=self.config, mesh=self.mesh,
                       placement=placement.value, router_bias=bias.value)
    self.sow("intermediates", "aux", aux)
    return y
