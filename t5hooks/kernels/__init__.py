"""Relative-position-bias attention: plain-PyTorch reference and fused Triton kernels.

`relbias_attention` is the entry point (it also registers `torch.ops.t5hooks.relbias_attention`);
triton itself is imported only when a kernel first runs.
"""

from .op import relbias_attention
from .reference import (
    allowed_keys,
    bias_and_mask,
    masked_softmax,
    position_bias,
    position_buckets,
    reference_relbias_attention,
    relative_position_bucket,
)

__all__ = [
    "allowed_keys",
    "bias_and_mask",
    "masked_softmax",
    "position_bias",
    "position_buckets",
    "reference_relbias_attention",
    "relative_position_bucket",
    "relbias_attention",
]
