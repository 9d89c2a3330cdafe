"""Dispatch strategies (DESIGN.md section 4) and the engine that runs them."""

from hiermoe_jax.dispatch import flat, flat_dedup, hier, hier_dedup
from hiermoe_jax.dispatch.base import Strategy

STRATEGIES: dict[str, Strategy] = {
    m.STRATEGY.name: m.STRATEGY for m in (flat, flat_dedup, hier, hier_dedup)
}


def get_strategy(name: str) -> Strategy:
  if name not in STRATEGIES:
    raise ValueError(f"dispatch={name!r} is not a strategy; expected one of {sorted(STRATEGIES)}")
  return STRATEGIES[name]
