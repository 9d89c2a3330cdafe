"""Dispatch strategies (docs/design.md, section 4): the registry and the engine.

`registry` declares every strategy once; `exchange` runs any of them
(dispatch -> the caller's expert compute -> combine); `capacity` sizes their
buffers; `auto` picks one per call from the live routing.
"""

from hiermoe_jax.dispatch.base import Strategy
from hiermoe_jax.dispatch.registry import get_strategy, names, register, unregister

__all__ = ["Strategy", "get_strategy", "names", "register", "unregister"]
