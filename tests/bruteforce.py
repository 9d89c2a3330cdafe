"""Brute-force simulation of a strategy's hops with Python loops (test oracle).

Follows the documented rules, not the vectorised code: first the capacity
decision keeps, per device and expert, the first `pair_cap` pairs in token order;
then every hop sends a row per
(item, destination peer) - an item is a (token, expert) pair without dedup, a
token or received row with dedup - in item order, keeping the first `capacity`
rows per (device, peer); receivers take rows by source peer, then position.
The expert stage keeps the first `capacity` entries per local expert in
(row, k) order.
"""

from __future__ import annotations

from hiermoe_jax.dispatch import get_strategy


def _peer(slot, tier, nodes, local, per_device):
  device = slot // per_device
  return {"flat": device, "inter": device // local, "intra": device % local}[tier]


def _source_device(receiver, q, tier, local):
  node, loc = divmod(receiver, local)
  return {"flat": q, "inter": q * local + loc, "intra": node * local + q}[tier]


def _peers(tier, nodes, local):
  return {"flat": nodes * local, "inter": nodes, "intra": local}[tier]


def keep_first(slots, pair_cap):
  """kept[d][t][k]: pair (t, k) is among the first pair_cap of its expert on device d."""
  kept = []
  for tokens in slots:
    seen = {}
    kept.append([])
    for token in tokens:
      kept[-1].append([])
      for s in token:
        seen[s] = seen.get(s, 0) + 1
        kept[-1][-1].append(pair_cap is None or seen[s] <= pair_cap)
  return kept


def simulate(slots, *, strategy, nodes, local, num_experts, hop_caps=None, expert_cap=None,
             pair_cap=None):
  """slots: nested lists [device][token][k] of physical slots.

  Returns dict with kept[d][t][k], dropped per stage, and sent[h][d][p] rows.
  Capacities of None mean unlimited.
  """
  strat = get_strategy(strategy)
  devices = nodes * local
  per_device = num_experts // devices
  kept = keep_first(slots, pair_cap)
  dropped = {"capacity": sum(not k for dev in kept for tok in dev for k in tok)}
  # A row: (origin device, token, [(k, slot), ...]) of kept pairs.
  rows = []
  for d in range(devices):
    mine = []
    for t, token in enumerate(slots[d]):
      entries = [(k, s) for k, s in enumerate(token) if kept[d][t][k]]
      if strat.dedup and entries:
        mine.append((d, t, entries))
      elif not strat.dedup:
        mine.extend((d, t, [entry]) for entry in entries)
    rows.append(mine)
  sent = []
  for h, tier in enumerate(strat.tiers):
    peers = _peers(tier, nodes, local)
    cap = None if hop_caps is None else hop_caps[h]
    outbox = [[[] for _ in range(peers)] for _ in range(devices)]
    lost = 0
    for d in range(devices):
      for origin, t, entries in rows[d]:
        for p in range(peers):
          part = [(k, s) for k, s in entries if _peer(s, tier, nodes, local, per_device) == p]
          if not part:
            continue
          if cap is None or len(outbox[d][p]) < cap:
            outbox[d][p].append((origin, t, part))
          else:
            lost += len(part)
            for k, _ in part:
              kept[origin][t][k] = False
    dropped[tier] = lost
    sent.append([[len(outbox[d][p]) for p in range(peers)] for d in range(devices)])
    rows = [[row for q in range(peers) for row in outbox[_source_device(r, q, tier, local)][
        _peer(r * per_device, tier, nodes, local, per_device)]] for r in range(devices)]
  lost = 0
  for d in range(devices):
    load = [0] * per_device
    for origin, t, entries in rows[d]:
      for k, s in entries:
        x = s - d * per_device
        assert 0 <= x < per_device
        if expert_cap is None or load[x] < expert_cap:
          load[x] += 1
        else:
          lost += 1
          kept[origin][t][k] = False
  dropped["expert"] = lost
  return {"kept": kept, "dropped": dropped, "sent": sent}
