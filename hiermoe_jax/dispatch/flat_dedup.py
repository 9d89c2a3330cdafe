"""`flat_dedup`: one all-to-all over all devices, one row per (token, destination
device) carrying that device's chosen experts and weights; the receiver expands
each row to its experts and pre-reduces their outputs before sending back.

Models DeepEP's intranode dispatch.
"""

from hiermoe_jax.dispatch.base import Strategy

STRATEGY = Strategy("flat_dedup", tiers=("device",), dedup=True)
