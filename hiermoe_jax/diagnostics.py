"""Host-side checks of a step's MoEAux: capacity drops.

    y, aux = hm.moe_apply(params, x, config=config, mesh=mesh)
    hm.check_drops(aux, config, threshold=0.01)   # warns with counts above 1%

The counts come from the jitted step; the check runs on the host, after the values
are fetched, so it costs nothing inside the compiled graph.
"""

from __future__ import annotations

import warnings

import numpy as np

from hiermoe_jax.config import MoEConfig


class CapacityWarning(UserWarning):
  """More (token, expert) pairs were dropped at capacity than the threshold allows."""


class DroplessViolation(RuntimeError):
  """A dropless layer dropped pairs: an invariant of the library is broken."""


def check_drops(aux, config: MoEConfig, *, threshold: float = 0.01, where: str = "MoE") -> float:
  """The drop rate (dropped / routed pairs) of one layer's aux; warns above threshold.

  Raises DroplessViolation if config.dropless and anything was dropped: dropless
  capacities are the worst case, so a drop there is a bug, never a tuning matter.
  """
  dropped = int(np.asarray(aux.dropped))
  pairs = int(np.asarray(aux.expert_counts).sum())
  return check_drop_counts(dropped, pairs, dropless=config.dropless,
                           capacity_factor=config.capacity_factor, threshold=threshold,
                           where=where)


def check_drop_counts(dropped: int, pairs: int, *, dropless: bool, capacity_factor: float,
                      threshold: float, where: str = "MoE") -> float:
  """check_drops on plain counts (what a trainer's metrics carry)."""
  if dropless and dropped:
    raise DroplessViolation(f"{where}: dropless dispatch dropped {dropped} of {pairs} "
                            "(token, expert) pairs; please report this as a bug")
  rate = dropped / pairs if pairs else 0.0
  if rate > threshold:
    warnings.warn(f"{where}: capacity dropped {dropped} of {pairs} (token, expert) pairs "
                  f"({rate:.2%} > threshold {threshold:.2%}); raise capacity_factor "
                  f"(now {capacity_factor}) or set dropless=True", CapacityWarning,
                  stacklevel=3)
  return rate
