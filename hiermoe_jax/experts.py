"""Expert compute: SwiGLU FFNs, down(silu(gate(x)) * up(x)), and the expert stage
that runs a device's local experts on the rows `exchange.dispatch` delivered.

Legend (docs/legend.md): X local experts, C rows per expert, R rows, M expert
entries per row, S expert-buffer slots, D model dim, F hidden dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hiermoe_jax.dispatch.assign import assign, entry_targets_IMP
from hiermoe_jax.dispatch.exchange import Layout
from hiermoe_jax.permute import permute, unpermute


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


def local_experts(rows_RD, slots_RM, w_RM, expert_params, *, capacity: int, layout: Layout):
  """Expands rows to this device's experts, runs the FFNs, pre-reduces per row.

  Each row's entries name physical slots (-1: not for this device) and weights.
  Returns (out_RD: the weighted sum of the row's experts' outputs, dropped: (row,
  expert) pairs past an expert's `capacity`).
  """
  num_local = layout.experts_per_device
  m = slots_RM.shape[1]
  local_RM = slots_RM - layout.shape.index("flat") * num_local
  valid_IP = entry_targets_IMP(slots_RM, local_RM, num_local).reshape(-1, num_local)
  packed = layout.expert_compute == "ragged_dot"
  table_S, kept_IP, counts_X = assign(valid_IP, capacity, packed=packed)  # items: (row, entry)
  dropped = jnp.sum(valid_IP & ~kept_IP, dtype=jnp.int32)

  filled_S = table_S >= 0
  row_S = jnp.where(filled_S, table_S // m, -1)
  w_S = jnp.where(filled_S, w_RM.reshape(-1)[jnp.where(filled_S, table_S, 0)], 0.0)
  x_SD = permute(rows_RD, row_S, impl=layout.permute_impl)
  dtype = rows_RD.dtype
  gate, up, down = (expert_params[k].astype(dtype) for k in ("gate", "up", "down"))
  with jax.named_scope("expert_compute"):
    if packed:
      y_SD = experts_ragged(x_SD, counts_X, gate, up, down)
    else:
      x_XCD = x_SD.reshape(num_local, capacity, -1)
      y_SD = experts_einsum(x_XCD, gate, up, down).reshape(x_SD.shape)
  # Pre-reduce: one weighted vector per received row, whatever its expert count.
  out_RD = unpermute(y_SD, row_S, w_S, num_tokens=rows_RD.shape[0], impl=layout.permute_impl)
  if layout.shape.tensor_axis:  # each tensor rank holds a slice of the FFN width
    out_RD = jax.lax.psum(out_RD, layout.shape.tensor_axis)
  return out_RD, dropped
