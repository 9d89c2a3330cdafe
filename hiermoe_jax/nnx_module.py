"""`hiermoe_jax.MoE`: the Flax NNX shell over `moe_apply`, called like an MLP.

    layer = MoE(config, mesh=mesh, rngs=nnx.Rngs(0))
    y = layer(x)                                   # x [..., d_model]
    # Losses and statistics: capture the sown intermediates of any model.
    y, inter = nnx.capture(model, nnx.Intermediate)(x)
    auxes = hiermoe_jax.collect_aux(inter)         # one MoEAux per MoE layer

Parameters are `nnx.Param`s carrying their PartitionSpec (`nnx.get_partition_spec`
sees the expert sharding). The DeepSeek selection bias is a `RouterBias` and the
expert placement an `ExpertPlacement`: state, not trained, so optimizers built on
`nnx.Param` leave them alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from hiermoe_jax.config import MoEConfig
from hiermoe_jax.moe import moe_apply
from hiermoe_jax.params import init_params_unsharded, param_specs
from hiermoe_jax.routing import update_router_bias
from hiermoe_jax.validate import validate_for_mesh


class RouterBias(nnx.Variable):
  """DeepSeek-V3 `e_score_correction_bias`: selection only, updated without gradients."""


class ExpertPlacement(nnx.Variable):
  """placement[slot] = logical expert held in that physical slot."""


class MoE(nnx.Module):
  def __init__(self, config: MoEConfig, *, mesh: Mesh, rngs: nnx.Rngs):
    validate_for_mesh(config, mesh)
    self.config = config
    self.mesh = mesh
    values = init_params_unsharded(rngs.params(), config)
    specs = param_specs(config)
    # A dict of Params: nnx treats it as a pytree of Variables.
    self.params = nnx.data(jax.tree.map(
        lambda v, s: nnx.Param(v, out_sharding=tuple(s), mesh=mesh), values, specs))
    self.router_bias = RouterBias(jnp.zeros((config.num_experts,), jnp.float32))
    self.placement = ExpertPlacement(jnp.arange(config.num_experts, dtype=jnp.int32))

  def __call__(self, x):
    params = jax.tree.map(lambda p: p[...], self.params,
                          is_leaf=lambda v: isinstance(v, nnx.Variable))
    y, aux = moe_apply(params, x, config=self.config, mesh=self.mesh,
                       placement=self.placement[...], router_bias=self.router_bias[...])
    self.sow(nnx.Intermediate, "aux", aux)
    return y

  def update_router_bias(self, expert_counts) -> None:
    """DeepSeek's aux-loss-free step; call between train steps with `aux.expert_counts`."""
    self.router_bias[...] = update_router_bias(self.router_bias[...], expert_counts,
                                               self.config.bias_update_rate)


