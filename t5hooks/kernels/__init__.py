"""Relative-position-bias attention: plain-PyTorch reference and fused Triton kernels."""

from .reference import (
    allowed_keys,
    bias_and_mask,
    masked_softmax,
    position_bias,
    position_buckets,
    reference_relbias_attention,
    relative_position_bucket,
    rows_with_keys,
)

__all__ = [
    "allowed_keys",
    "bias_and_mask",
    "masked_softmax",
    "position_bias",
    "position_buckets",
    "reference_relbias_attention",
    "relative_position_bucket",
    "rows_with_keys",
]
