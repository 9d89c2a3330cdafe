"""Pallas (Triton) token-permutation kernels for MoE dispatch/combine.

See ``pallas_kernels.permute`` for the shape legend and index convention.
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
