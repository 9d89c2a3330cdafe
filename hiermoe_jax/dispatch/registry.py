"""The one table of dispatch strategies.

Everything that lists strategies derives from it: `MoEConfig.dispatch`'s valid
values, the cost model's stages (a strategy's tiers), `auto`'s candidates, the
traffic statistics and the benchmarks. Adding a strategy is one `register` call;
the exchange engine runs it and the cost model prices it from its record.
"""

from __future__ import annotations

from hiermoe_jax.dispatch.base import Strategy

_STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
  """Adds a strategy (its name must be new and not "auto")."""
  if not isinstance(strategy, Strategy):
    raise TypeError(f"register: expected a Strategy, got {type(strategy).__name__}")
  if strategy.name in _STRATEGIES or strategy.name == "auto":
    raise ValueError(f"register: a strategy named {strategy.name!r} already exists")
  _STRATEGIES[strategy.name] = strategy
  return strategy


def unregister(name: str) -> None:
  """Removes a strategy added with `register` (for tests that add their own)."""
  _STRATEGIES.pop(name)


def names() -> tuple[str, ...]:
  """Registered strategy names, in registration order (built-ins first)."""
  return tuple(_STRATEGIES)


def get_strategy(name: str) -> Strategy:
  if name not in _STRATEGIES:
    raise ValueError(f"dispatch={name!r} is not a strategy; expected one of {names()}")
  return _STRATEGIES[name]


# The built-in strategies (docs/design.md, section 4), slowest tier first.
# flat: one copy per (token, expert) over all devices - Megatron-LM's alltoall
#   dispatcher, GShard.
register(Strategy("flat", tiers=("flat",), dedup=False))
# flat_dedup: one row per (token, destination device) carrying that device's
#   chosen experts and weights; the receiver pre-reduces - DeepEP intranode.
register(Strategy("flat_dedup", tiers=("flat",), dedup=True))
# hier: inter-node to the same local index on the expert's node, then intra-node,
#   one copy per (token, expert) - Tutel's 2DH all-to-all.
register(Strategy("hier", tiers=("inter", "intra"), dedup=False))
# hier_dedup (HierMoE): one copy per (token, destination node), then one per
#   (row, destination device); combine pre-reduces at both receivers, so inter-node
#   rows reach the floor - once per distinct remote node.
register(Strategy("hier_dedup", tiers=("inter", "intra"), dedup=True))
