"""`hier_dedup` (HierMoE): hierarchical token deduplication.

Stage 1 over `node` sends one copy per (token, destination node), to the device
with the same local index there; stage 2 over `local` sends one copy per (stage-1
row, destination device). Combine reverses both and pre-reduces at each: the
expert device sums its experts' weighted outputs per row, and the stage-1
receiver sums over its node, so each tier carries one vector per (token,
destination) back. Inter-node rows reach the floor: once per distinct node.
"""

from hiermoe_jax.dispatch.base import Strategy

STRATEGY = Strategy("hier_dedup", tiers=("node", "local"), dedup=True)
