"""Placing items into fixed-capacity buffers, the bookkeeping of every stage.

Used by each exchange hop (items -> peers) and by the expert stage (row entries
-> local experts). Legend (docs/legend.md): I items, M entries per item, P
destinations (peers or local experts), C capacity per destination, S = P * C
buffer slots.
"""

from __future__ import annotations

import jax.numpy as jnp


def entry_targets_IMP(slots_IM, dest_IM, destinations: int):
  """[I, M, P] mask: entry (i, m) is live (slot >= 0) and goes to destination p."""
  return (slots_IM >= 0)[..., None] & (dest_IM[..., None] == jnp.arange(destinations))


def assign(valid_IP, capacity: int, packed: bool):
  """Places items at (destination, position) in item order.

  Returns (table_S: the item filling each slot, -1 for padding; kept_IP; counts_P).
  Items past a destination's capacity are dropped: lower item index wins, so drops
  are deterministic.
  packed=False: slot = p * C + position (a padded buffer per destination).
  packed=True: destinations' kept items are contiguous (for ragged expert compute).
  """
  num_items, destinations = valid_IP.shape
  pos_IP = jnp.cumsum(valid_IP, axis=0, dtype=jnp.int32) - 1
  kept_IP = valid_IP & (pos_IP < capacity)
  counts_P = jnp.sum(kept_IP, axis=0, dtype=jnp.int32)
  if packed:
    base_P = jnp.cumsum(counts_P) - counts_P
  else:
    base_P = jnp.arange(destinations, dtype=jnp.int32) * capacity
  size = destinations * capacity
  index_IP = jnp.where(kept_IP, base_P + pos_IP, size)
  items_IP = jnp.broadcast_to(jnp.arange(num_items, dtype=jnp.int32)[:, None], valid_IP.shape)
  table_S = jnp.full((size,), -1, jnp.int32).at[index_IP.reshape(-1)].set(
      items_IP.reshape(-1), mode="drop")
  return table_S, kept_IP, counts_P
