"""`flat`: one all-to-all over all devices, one copy per (token, expert).

The baseline: Megatron-LM's alltoall dispatcher, GShard.
"""

from hiermoe_jax.dispatch.base import Strategy

STRATEGY = Strategy("flat", tiers=("device",), dedup=False)
