"""`hier`: two all-to-alls, inter-node then intra-node, one copy per (token, expert).

Stage 1 goes over `node` to the device with the same local index on the expert's
node; stage 2 goes over `local` to the expert's device. The traffic pattern of
Tutel's 2DH all-to-all: it aggregates messages but sends every copy across nodes.
"""

from hiermoe_jax.dispatch.base import Strategy

STRATEGY = Strategy("hier", tiers=("node", "local"), dedup=False)
