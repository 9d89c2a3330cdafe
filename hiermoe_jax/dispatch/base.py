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


@dataclasses.dataclass(frozen=True)
class Strategy:
  name: str
  tiers: tuple[str, ...]
  dedup: bool

  def __post_init__(self):
    for tier in self.tiers:
      if tier not in TIERS:
        raise ValueError(f"Strategy {self.name!r}: tier {tier!r} must be one of {TIERS}")
