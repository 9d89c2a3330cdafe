"""What a dispatch strategy is: a sequence of all-to-all hops over mesh tiers.

A strategy is fully described by
  - `tiers`: the hops, slowest link first. "device" is one all-to-all over all
    devices; "node" goes to the device with the same local index on the
    destination node; "local" goes between the devices of one node.
  - `dedup`: whether a row is sent once per (token, destination group) carrying
    all of that group's chosen experts (HierMoE), or once per (token, expert).
The exchange engine (`exchange.py`) runs any such strategy; each strategy module
only declares itself, so adding one does not touch the others.
"""

from __future__ import annotations

import dataclasses

TIERS = ("device", "node", "local")


def peer_along(device, tier: str, shape):
  """A device's index along `tier`: its peer index in a hop over that tier.

  Plain arithmetic, so it serves numpy (host statistics) and jnp (devices) alike.
  """
  if tier == "device":
    return device
  if tier == "node":
    return device // shape.local
  return device % shape.local


def traffic_classes(device, peer, tier: str, shape) -> dict:
  """Masks of the rows `device` sends to `peer` in a hop over `tier`, by link:
  "inter" crosses nodes, "intra" stays in one; rows to itself are in neither."""
  if tier == "device":
    same_node = peer // shape.local == device // shape.local
    return {"inter": ~same_node, "intra": same_node & (peer != device)}
  kind = "inter" if tier == "node" else "intra"
  return {kind: peer != peer_along(device, tier, shape)}


@dataclasses.dataclass(frozen=True)
class Strategy:
  name: str
  tiers: tuple[str, ...]
  dedup: bool

  def __post_init__(self):
    for tier in self.tiers:
      if tier not in TIERS:
        raise ValueError(f"Strategy {self.name!r}: tier {tier!r} must be one of {TIERS}")
