"""Pallas (Triton) token-permutation kernels for MoE dispatch/combine.

See `pallas_kernels.permute` for the legend and the permute / unpermute contract, which the
XLA path (`hiermoe_jax.permute`, running the `*_reference` functions) shares.
"""

from pallas_kernels.permute import (
    PermuteConfig,
    permute,
    permute_reference,
    unpermute,
    unpermute_reference,
)

__all__ = [
    "PermuteConfig",
    "permute",
    "permute_reference",
    "unpermute",
    "unpermute_reference",
]
