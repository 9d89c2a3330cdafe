"""Expert swap: choose a better placement (`search`) and move the experts (`migrate`).

    plan = swap.search(topk_ids, placement, mesh_shape, swap.SearchConfig(...))
    if plan.changed:
      params, opt_state = swap.migrate((params, opt_state), placement, plan.placement, mesh)
      placement = plan.placement

The names `search` and `migrate` here are the functions; import helpers from the
modules directly (`from hiermoe_jax.swap.search import stage_loads`).
"""

from hiermoe_jax.swap.migrate import expert_leaf, migrate, plan_moves
from hiermoe_jax.swap.search import SearchConfig, SwapPlan, search

__all__ = ["SearchConfig", "SwapPlan", "expert_leaf", "migrate", "plan_moves", "search"]
