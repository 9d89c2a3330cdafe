"""Dense float32 reference: each token through its chosen experts, computed directly.

No mesh, no capacity, no exchange: the ground truth every strategy is tested
against. `kept_TK` optionally removes (token, expert) pairs (e.g. those a
capacity-limited run dropped), which then contribute zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hiermoe_jax import routing as routing_lib
from hiermoe_jax.config import MoEConfig
from hiermoe_jax.experts import shared_experts, swiglu


def reference_routing(params, x, config: MoEConfig, router_bias=None):
  x_TD = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  logits_TE = x_TD @ params["router"]["kernel"].astype(jnp.float32)
  return routing_lib.route(logits_TE, config, router_bias)


def reference_moe(params, x, config: MoEConfig, *, placement=None, router_bias=None,
                  kept_TK=None):
  """y [..., D] in float32. `placement` maps physical slot -> logical expert."""
  params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  x_TD = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  routing = reference_routing(params, x, config, router_bias)
  experts = params["experts"]
  if placement is not None:  # bring the physical stack back to logical order
    order = jnp.argsort(jnp.asarray(placement))
    experts = jax.tree.map(lambda a: a[order], experts)
  # Every expert on every token, then pick the chosen ones: simple and exact.
  y_TED = jax.vmap(lambda g, u, d: swiglu(x_TD, g, u, d), out_axes=1)(
      experts["gate"], experts["up"], experts["down"])
  chosen_TKD = jnp.take_along_axis(y_TED, routing.ids_TK[..., None], axis=1)
  w_TK = routing.weights_TK if kept_TK is None else jnp.where(kept_TK, routing.weights_TK, 0.0)
  y_TD = jnp.einsum("tk,tkd->td", w_TK, chosen_TKD)
  if config.shared_width:
    y_TD = y_TD + shared_experts(params, x_TD)
  return y_TD.reshape(x.shape)
