"""Expert swap: choose a better placement (`search`), move the experts (`migrate`),
and decide when (`SwapController`).

    plan = swap.search(topk_ids, placement, mesh_shape, swap.SearchConfig(...))
    if plan.changed:
      params, opt_state = swap.migrate((params, opt_state), placement, plan.placement, mesh)
      placement = plan.placement

or, in a training loop, `SwapController.calibrate((params, opt_state), placements)`
once (compiles the migration program, measures its price), then
`SwapController.observe(layer, topk_ids)` after each step and
`SwapController.maybe_swap(step, (params, opt_state), placements)`. One compiled
migration program serves every decision (`migrate.stats` counts compilations).

The names `search` and `migrate` here are the functions; import helpers from the
modules directly (`from hiermoe_jax.swap.search import stage_loads`).
"""

from hiermoe_jax.swap.controller import SwapController, SwapError, experts_under
from hiermoe_jax.swap.migrate import expert_leaf, migrate, migrate_many, move_tables
from hiermoe_jax.swap.search import SearchConfig, SwapPlan, search

__all__ = ["SearchConfig", "SwapController", "SwapError", "SwapPlan", "expert_leaf",
           "experts_under", "migrate", "migrate_many", "move_tables", "search"]
