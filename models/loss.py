"""Next-token cross entropy that never holds the [B, S, V] float32 logits.

At a large vocabulary the logits dominate a train step's memory: Qwen3-30B-A3B's
151,936 entries make 8 x 4096 x V float32 logits (and as large a softmax gradient)
20 GB per device. `cross_entropy` with `chunk` > 0 unembeds the final hidden states
`chunk` sequence positions at a time in a lax.scan; jax.checkpoint on the chunk body
makes the backward recompute each chunk's logits instead of keeping them, so one
chunk's logits, [rows per device, chunk, V], are live at a time. The value and the
gradients are those of the plain loss up to float32 summation order.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax


def cross_entropy(hidden_BSD, targets_BS, unembed: Callable, chunk: int = 0) -> jax.Array:
  """Mean cross entropy of `unembed(hidden)` (float32 logits [..., V]) against targets.

  chunk: sequence positions unembedded at a time; 0 (or >= S) unembeds all at once. S
  need not be a multiple: the last chunk is padded and its padding masked out.
  """
  b, s, d = hidden_BSD.shape
  if not chunk or chunk >= s:
    return optax.softmax_cross_entropy_with_integer_labels(unembed(hidden_BSD),
                                                           targets_BS).mean()
  n = -(-s // chunk)
  pad = n * chunk - s
  # Chunks along the sequence, not the (device-sharded) batch: each chunk keeps every
  # device's rows, so the scan runs on all devices at once.
  h_NBCD = jnp.pad(hidden_BSD, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d)
  t_NBC = jnp.pad(targets_BS, ((0, 0), (0, pad))).reshape(b, n, chunk)
  valid_NC = (jnp.arange(n * chunk) < s).reshape(n, chunk)

  @jax.checkpoint
  def chunk_sum(h_BCD, t_BC, valid_C):
    ce_BC = optax.softmax_cross_entropy_with_integer_labels(unembed(h_BCD), t_BC)
    return jnp.sum(jnp.where(valid_C, ce_BC, 0.0), dtype=jnp.float32)

  def body(total, xs):
    return total + chunk_sum(*xs), None

  total, _ = jax.lax.scan(body, jnp.float32(0),
                          (h_NBCD.swapaxes(0, 1), t_NBC.swapaxes(0, 1), valid_NC))
  return total / (b * s)
