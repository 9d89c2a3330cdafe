"""`hiermoe_jax.MoE`: the Flax NNX shell over `moe_apply`, called like an MLP.

    layer = MoE(config, mesh=mesh, rngs=nnx.Rngs(0))
    layer.load_hf(state_dict, prefix="model.layers.3.mlp.")   # optional: HF weights
    y = layer(x)                                   # x [..., d_model]
    # Losses and statistics: capture the sown intermediates of any model.
    y, inter = nnx.capture(model, nnx.Intermediate)(x)
    auxes = hiermoe_jax.collect_aux(inter)         # one MoEAux per MoE layer

Parameters are `nnx.Param`s carrying their PartitionSpec (`nnx.get_partition_spec`
sees the expert sharding). The DeepSeek selection bias is a `RouterBias` and the
expert placement an `ExpertPlacement`: state, not trained, so optimizers built on
`nnx.Param` leave them alone. Every variable lives on the layer's mesh with its
declared sharding from the start (replicated ones too): a jitted step then gets the
shardings it returns and compiles once.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hiermoe_jax.config import MoEConfig
from hiermoe_jax.convert import from_hf
from hiermoe_jax.moe import moe_apply
from hiermoe_jax.params import identity_placement, init_params, init_router_bias, param_specs
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
    # Sharded at creation, replicated leaves included: Param's eager sharding skips
    # an empty spec, which would leave them on one device.
    values = init_params(rngs.params(), config, mesh)
    # A dict of Params: nnx treats it as a pytree of Variables.
    self.params = nnx.data(jax.tree.map(
        lambda v, s: nnx.Param(v, out_sharding=tuple(s), mesh=mesh), values, param_specs(config)))
    self.router_bias = RouterBias(self._replicated(init_router_bias(config)))
    self.placement = ExpertPlacement(self._replicated(identity_placement(config)))

  def _replicated(self, value):
    return jax.device_put(value, NamedSharding(self.mesh, PartitionSpec()))

  def __call__(self, x):
    params = jax.tree.map(lambda p: p[...], self.params,
                          is_leaf=lambda v: isinstance(v, nnx.Variable))
    y, aux = moe_apply(params, x, config=self.config, mesh=self.mesh,
                       placement=self.placement[...], router_bias=self.router_bias[...])
    # Sow only into an nnx.capture (the attribute exists while one runs, as in
    # Module.sow itself): outside one, flax 0.12 deprecates sowing into the module.
    if hasattr(self, "__captures__"):
      self.sow(nnx.Intermediate, "aux", aux)
    return y

  def load_hf(self, state_dict, *, prefix: str = "") -> None:
    """Loads one Hugging Face MoE block's weights (see `convert.from_hf`), each on this
    layer's mesh with its sharding. The placement becomes the identity (the
    checkpoint's expert order); the selection bias is the checkpoint's, or zero."""
    params, bias = from_hf(state_dict, self.config, prefix=prefix, mesh=self.mesh)
    jax.tree.map(lambda var, value: var.set_value(value), self.params, params,
                 is_leaf=lambda v: isinstance(v, nnx.Variable))
    self.router_bias.set_value(
        self._replicated(init_router_bias(self.config) if bias is None else bias))
    self.placement.set_value(self._replicated(identity_placement(self.config)))

  def update_router_bias(self, expert_counts) -> None:
    """DeepSeek's aux-loss-free step; call between train steps with `aux.expert_counts`."""
    self.router_bias[...] = update_router_bias(self.router_bias[...], expert_counts,
                                               self.config.bias_update_rate)


