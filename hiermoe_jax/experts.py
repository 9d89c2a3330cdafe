"""SwiGLU expert FFNs: down(silu(gate(x)) * up(x)).

Legend: X local experts, C rows per expert, R rows, D model dim, F hidden dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def swiglu(x, gate, up, down):
  """Dense SwiGLU FFN for one expert (or the shared experts): x [..., D]."""
  return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def experts_einsum(x_XCD, gate_XDF, up_XDF, down_XFD):
  """All local experts at once on a capacity-padded buffer."""
  h_XCF = jax.nn.silu(jnp.einsum("xcd,xdf->xcf", x_XCD, gate_XDF)) * jnp.einsum(
      "xcd,xdf->xcf", x_XCD, up_XDF)
  return jnp.einsum("xcf,xfd->xcd", h_XCF, down_XFD)


def experts_ragged(x_RD, group_sizes_X, gate_XDF, up_XDF, down_XFD):
  """Grouped matmul over rows sorted by expert; rows past sum(group_sizes) give zeros."""
  h_RF = jax.nn.silu(jax.lax.ragged_dot(x_RD, gate_XDF, group_sizes_X)) * jax.lax.ragged_dot(
      x_RD, up_XDF, group_sizes_X)
  return jax.lax.ragged_dot(h_RF, down_XFD, group_sizes_X)


def shared_experts(params: dict, x_TD):
  """Always-on shared FFN, optionally scaled by Qwen2-MoE's sigmoid gate."""
  shared = params["shared"]
  dtype = x_TD.dtype
  y_TD = swiglu(x_TD, shared["gate"].astype(dtype), shared["up"].astype(dtype),
                shared["down"].astype(dtype))
  if "shared_gate" in params:
    gate_T1 = jax.nn.sigmoid((x_TD @ params["shared_gate"]["kernel"].astype(dtype))
                             .astype(jnp.float32))
    y_TD = (y_TD.astype(jnp.float32) * gate_T1).astype(dtype)
  return y_TD
