"""hiermoe-jax: hierarchical, deduplicated Mixture-of-Experts dispatch in JAX."""

from hiermoe_jax.config import MoEConfig
from hiermoe_jax.diagnostics import CapacityWarning, check_drops
from hiermoe_jax.mesh import make_mesh
from hiermoe_jax.moe import MoEAux, collect_aux, moe_apply
from hiermoe_jax.params import identity_placement, init_params, init_router_bias
from hiermoe_jax.reference import reference_moe
from hiermoe_jax.routing import update_router_bias

__all__ = [
    "MoEConfig", "MoEAux", "collect_aux", "make_mesh", "moe_apply", "init_params", "init_router_bias",
    "identity_placement", "reference_moe", "update_router_bias", "CapacityWarning", "check_drops",
]

from hiermoe_jax import convert, gpu_aot, linen  # noqa: E402  (submodules reached as attributes)
from hiermoe_jax.nnx_module import MoE, ExpertPlacement, RouterBias  # noqa: E402

__all__ += ["MoE", "ExpertPlacement", "RouterBias", "convert", "gpu_aot", "linen"]
