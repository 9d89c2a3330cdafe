"""The capacity decision: which (token, expert) pairs are kept, before any dispatch.

Per token group (the T tokens of one device), per logical expert, the first C
pairs in token order are kept and the rest dropped, with
    C = min(T, max(1, ceil(capacity_factor * T * K / E)))
(`pair_capacity`). The decision reads only the routing, so it does not depend on
the placement (a bijection: counting per physical slot is counting per logical
expert), on the chunking (it is taken on all T tokens before chunking) or on the
strategy; the stage buffers (`capacity.capacities`) are then sized never to drop
a kept pair. Dropped pairs get slot -1 and weight 0: no stage sends or counts them.
Legend (docs/legend.md): T tokens, K top-k, E experts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def pair_capacity(*, tokens: int, top_k: int, num_experts: int, capacity_factor: float,
                  dropless: bool) -> int:
  """C: (token, expert) pairs kept per (token group, logical expert). Dropless: T,
  which keeps everything (a token picks an expert at most once)."""
  if dropless:
    return tokens
  return min(tokens, max(1, math.ceil(capacity_factor * tokens * top_k / num_experts)))


def keep_first(ids_TK, capacity: int):
  """kept_TK: pair (t, k) is among the first `capacity` pairs of its expert, in token
  order. ids_TK: expert ids (logical, or physical slots: any bijection of them gives
  the same mask); entries < 0 are already dropped and stay so."""
  ids_I = ids_TK.reshape(-1)
  valid_I = ids_I >= 0
  # Stable sort by expert keeps token order within an expert; invalid entries last.
  key_I = jnp.where(valid_I, ids_I, jnp.iinfo(jnp.int32).max)
  order_I = jnp.argsort(key_I, stable=True)
  sorted_I = key_I[order_I]
  position = jnp.arange(ids_I.shape[0], dtype=jnp.int32)
  run_start_I = jnp.concatenate([jnp.ones((1,), bool), sorted_I[1:] != sorted_I[:-1]])
  first_I = jax.lax.cummax(jnp.where(run_start_I, position, 0))
  rank_I = jnp.zeros_like(position).at[order_I].set(position - first_I)
  return (valid_I & (rank_I < capacity)).reshape(ids_TK.shape)


def apply_keep(slots_TK, w_TK, capacity: int | None):
  """(slots, weights, dropped pairs) after the capacity decision; None: dropless."""
  if capacity is None:
    return slots_TK, w_TK, jnp.int32(0)
  kept_TK = keep_first(slots_TK, capacity)
  dropped = jnp.sum(~kept_TK & (slots_TK >= 0), dtype=jnp.int32)
  return (jnp.where(kept_TK, slots_TK, -1), jnp.where(kept_TK, w_TK, jnp.zeros_like(w_TK)),
          dropped)
