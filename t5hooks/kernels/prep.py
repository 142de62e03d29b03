"""Host-side inputs of the Triton kernels, computed with a handful of small torch ops.

The kernels never evaluate T5's bucket function (no per-element logarithm). They read the bias
from a vector indexed by signed distance, using one fact about the bucketing:

    every distance r >= max_distance shares one bucket, and so does every r <= -max_distance
    (unidirectional: every r >= 0 shares bucket 0),

so `bias(r) == bias(clamp(r, -bound, bound))` with `bound = max_distance`. The per-head bias over
the `2 * bound + 1` clamped distances is `[H, 2*bound+1]` floats whatever the sequence lengths or
the query offset: it stays in L1/L2 and a tile gathers from it at `clamp(j - i - q_offset) + bound`.
A tile whose distances all lie beyond `bound` on one side has a single bias per head (a "far"
tile); only tiles near the diagonal gather.

Nothing here imports triton.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .reference import relative_position_bucket

LOG2E = 1.0 / math.log(2.0)


def max_exact(num_buckets: int, bidirectional: bool) -> int:
    """Number of distances per direction that get a bucket each (the rest are log-spaced)."""
    return (num_buckets // 2 if bidirectional else num_buckets) // 2


def distance_bound(max_distance: int, has_bias: bool) -> int:
    """Clamp bound of the distance vector; tiles with all `|r| >= bound` on one side are "far".

    Without a table the kernels still split tiles by distance, with bound 1: "far" tiles are then
    those strictly below the diagonal (never hit by a causal mask) or strictly above it.
    """
    return max_distance if has_bias else 1


def bucket_by_distance(
    num_buckets: int, max_distance: int, *, bidirectional: bool, device: torch.device | str | None = None
) -> Tensor:
    """Bucket id of each clamped distance `r = -bound .. bound`: `[2*bound+1]` int32."""
    distances = torch.arange(-max_distance, max_distance + 1, device=device)
    buckets = relative_position_bucket(
        distances, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    return buckets.to(torch.int32)


def bias_by_distance(rel_bias_table: Tensor, buckets: Tensor) -> Tensor:
    """Per-head bias of each clamped distance, in log2 units (times log2 e): `[H, 2*bound+1]` fp32.

    The kernels run the softmax with `exp2`, so the bias is pre-multiplied by log2 e here, once.
    """
    return (rel_bias_table.float()[buckets.long()] * LOG2E).t().contiguous()  # [2*bound+1,H] -> [H,2*bound+1]


def key_mask_int8(key_padding_mask: Tensor) -> Tensor:
    """`[B, K]` mask of any dtype (nonzero = attend) as contiguous int8, the layout the kernels read."""
    return (key_padding_mask != 0).to(torch.int8).contiguous()


def key_ranges(key_padding_mask: Tensor) -> Tensor:
    """First allowed key and last allowed key + 1 of each batch row of a `[B, K]` mask: `[B, 2]` int32.

    The kernels only visit key blocks inside this range, so right (or left) padding costs nothing;
    a row with no allowed key gets the empty range `(K, 0)`.
    """
    k_len = key_padding_mask.shape[1]
    allowed = key_padding_mask != 0  # [B,K]
    index = torch.arange(k_len, device=key_padding_mask.device, dtype=torch.int32)
    first = torch.where(allowed, index, k_len).amin(dim=1)
    last_plus_one = torch.where(allowed, index + 1, 0).amax(dim=1)
    return torch.stack([first, last_plus_one], dim=1).to(torch.int32).contiguous()


def unit_last_stride(x: Tensor) -> Tensor:
    """The kernels take any batch/head/sequence strides but read the head dim contiguously."""
    return x if x.stride(-1) == 1 else x.contiguous()
