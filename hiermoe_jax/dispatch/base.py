"""What a dispatch strategy is: a sequence of all-to-all hops over link tiers.

One tier vocabulary serves the engine, the cost model, traffic counts and the
benchmarks (docs/design.md, section 4):
  - "flat":  one all-to-all over all expert devices;
  - "inter": over the slowest expert axis (e.g. "node"), to the device with the
             same fast-axis index on the destination node;
  - "intra": over the fast expert axis (e.g. "local"), between the devices of one
             node.
A strategy is fully described by its `tiers` (the hops in order; the cost model
prices a hop by its tier) and `dedup`: whether a row is sent once per (token,
destination group), carrying all of that group's chosen experts (HierMoE), or
once per (token, expert). The exchange engine (`exchange.py`) runs any such
strategy. Strategies are declared once, in `registry.py`'s table.

The helpers here are plain arithmetic, so they serve numpy (host statistics) and
jnp (devices) alike. `shape` is a `mesh.MeshShape` (nodes N, local L).
"""

from __future__ import annotations

import dataclasses

TIERS = ("flat", "inter", "intra")


def tier_peers(tier: str, shape) -> int:
  """Peers of one all-to-all over `tier`."""
  return {"flat": shape.devices, "inter": shape.nodes, "intra": shape.local}[tier]


def peer_along(device, tier: str, shape):
  """A device's index along `tier`: its peer index in a hop over that tier."""
  if tier == "flat":
    return device
  if tier == "inter":
    return device // shape.local
  return device % shape.local


def receiver(device, peer, tier: str, shape):
  """The device that `peer` (an index along `tier`) names for a sender `device`."""
  if tier == "flat":
    return peer
  if tier == "inter":
    return peer * shape.local + device % shape.local
  return (device // shape.local) * shape.local + peer


def traffic_classes(device, peer, tier: str, shape) -> dict:
  """Masks of the rows `device` sends to `peer` in a hop over `tier`, by link:
  "inter" crosses nodes, "intra" stays in one; rows to itself are in neither."""
  if tier == "flat":
    same_node = peer // shape.local == device // shape.local
    return {"inter": ~same_node, "intra": same_node & (peer != device)}
  return {tier: peer != peer_along(device, tier, shape)}


@dataclasses.dataclass(frozen=True)
class Strategy:
  """A strategy's record. `auto_candidate`: `auto` may pick it (see auto.candidates)."""
  name: str
  tiers: tuple[str, ...]
  dedup: bool
  auto_candidate: bool = True

  def __post_init__(self):
    tiers = tuple(self.tiers)
    object.__setattr__(self, "tiers", tiers)
    valid = "a non-empty sequence of distinct tiers from " f"{TIERS}, with 'flat' only alone"
    if (not tiers or any(t not in TIERS for t in tiers) or len(set(tiers)) != len(tiers)
        or ("flat" in tiers and len(tiers) > 1)):
      raise ValueError(f"Strategy {self.name!r}: tiers={tiers!r} is invalid: must be {valid}")
