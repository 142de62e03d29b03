"""Relative-position-bias attention in plain PyTorch: the reference every other path is checked against.

T5 adds to every attention score a learned scalar per head, looked up by the bucketed signed
distance `key_position - query_position` in a `[num_buckets, H]` table. The pieces here are the
single implementation of that idea in the package: the model's materialised attention path
(which needs hook points between the steps), the `backend="reference"` kernel path, and the
exported ONNX graphs all call them.

Shapes: B batch, H heads, Q/K query/key lengths, d head dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def relative_position_bucket(
    relative_position: Tensor, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> Tensor:
    """Map signed distances `key_pos - query_pos` to T5's bucket ids (int64, same shape).

    Bidirectional (encoder): half the buckets for keys after the query, half for keys at or before.
    Unidirectional (decoder): only keys at or before the query get distinct buckets; later keys
    share bucket 0 (they are masked anyway). Within a half, distances below `num_buckets // 4`
    (or `// 2` unidirectional) get one bucket each, longer ones log-spaced buckets up to
    `max_distance`, beyond which all distances share the last bucket.

    Matches Hugging Face's `T5Attention._relative_position_bucket` exactly, but never takes
    `log(0)`: the logarithm only ever sees distances >= the exact range, so the graph is
    free of `-inf` (which ONNX casts to integers unpredictably).
    """
    relative_position = relative_position.long()
    if bidirectional:
        num_buckets //= 2
        bucket_offset = (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        bucket_offset = torch.zeros_like(relative_position)
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = torch.log(distance.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket_offset + torch.where(is_small, distance, large)


def position_buckets(
    q_len: int,
    k_len: int,
    *,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
    q_offset: int | Tensor = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Bucket id for every (query, key) pair: `[Q, K]` int64. Query i sits at position `i + q_offset`."""
    query_pos = torch.arange(q_len, device=device)[:, None] + q_offset
    key_pos = torch.arange(k_len, device=device)[None, :]
    return relative_position_bucket(
        key_pos - query_pos, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )


def position_bias(
    rel_bias_table: Tensor,
    q_len: int,
    k_len: int,
    *,
    bidirectional: bool,
    max_distance: int,
    q_offset: int | Tensor = 0,
) -> Tensor:
    """Materialise the bias `[1, H, Q, K]` from a `[num_buckets, H]` table."""
    buckets = position_buckets(
        q_len,
        k_len,
        bidirectional=bidirectional,
        num_buckets=rel_bias_table.shape[0],
        max_distance=max_distance,
        q_offset=q_offset,
        device=rel_bias_table.device,
    )
    return rel_bias_table[buckets].permute(2, 0, 1).unsqueeze(0)  # [Q,K,H] -> [1,H,Q,K]


def causal_keys(q_len: int, k_len: int, q_offset: int | Tensor = 0, device: torch.device | str | None = None) -> Tensor:
    """`[1, 1, Q, K]` bool: key j is at or before query i's absolute position `i + q_offset`."""
    query_pos = torch.arange(q_len, device=device)[:, None] + q_offset
    key_pos = torch.arange(k_len, device=device)[None, :]
    return (key_pos <= query_pos)[None, None]


def allowed_keys(
    key_padding_mask: Tensor | None,
    q_len: int,
    k_len: int,
    *,
    causal: bool = False,
    q_offset: int | Tensor = 0,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """Which keys each query may attend to: bool `[B or 1, 1, Q, K]`, or None when all may.

    `key_padding_mask` is `[B, K]` with 1 (or True) = attend. Causal masking hides keys after
    the query's absolute position `i + q_offset`.
    """
    allowed = None
    if key_padding_mask is not None:
        allowed = key_padding_mask.bool()[:, None, None, :]  # [B,1,1,K]
        device = key_padding_mask.device
    if causal:
        causal_allowed = causal_keys(q_len, k_len, q_offset, device)  # [1,1,Q,K]
        allowed = causal_allowed if allowed is None else allowed & causal_allowed
    return allowed


def bias_and_mask(
    bias: Tensor | None,
    key_padding_mask: Tensor | None,
    q_len: int,
    k_len: int,
    *,
    causal: bool = False,
    q_offset: int | Tensor = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """Position bias and mask as one additive score term `[B or 1, H or 1, Q, K]` in `dtype` (None: neither).

    The mask's values are TransformerLens 3.9's: a padding key (`key_padding_mask` 0) scores
    `torch.finfo(dtype).min`, a key after the query (causal) `-inf`; a key hidden both ways is `-inf`. The bias of a
    padding key is absorbed (`bias + finfo.min == finfo.min`), so the scores a hook sees are those values exactly.
    Computed once per stack and shared by all its layers, as T5 shares the bias. A row with no visible key is
    softmaxed by `masked_softmax` to zeros, never NaN or uniform.
    """
    hidden = None
    if key_padding_mask is not None:
        device = key_padding_mask.device
        padding = torch.zeros(key_padding_mask.shape, dtype=dtype, device=device)
        hidden = padding.masked_fill(~key_padding_mask.bool(), torch.finfo(dtype).min)[:, None, None, :]  # [B,1,1,K]
    if causal:
        after = ~causal_keys(q_len, k_len, q_offset, device if bias is None else bias.device)
        causal_term = torch.zeros(after.shape, dtype=dtype, device=after.device).masked_fill(after, float("-inf"))
        hidden = causal_term if hidden is None else hidden + causal_term  # finfo.min + -inf = -inf
    if hidden is None:
        return None if bias is None else bias.to(dtype)
    return hidden if bias is None else bias.to(dtype) + hidden


def rows_with_keys(allowed: Tensor | None) -> Tensor | None:
    """`[B or 1, 1, Q, 1]` bool: which query rows have at least one allowed key (None: all do)."""
    return None if allowed is None else allowed.any(dim=-1, keepdim=True)


def masked_softmax(scores: Tensor, row_has_key: Tensor | None = None) -> Tensor:
    """Softmax over keys in at least fp32; rows without any allowed key come out as zeros, never NaN.

    Hidden keys score `finfo.min` (padding) or `-inf` (causal); a row with no allowed key is softmaxed from zeros
    instead (so neither its value nor its gradient is NaN, and it is not uniform) and then zeroed."""
    dtype = torch.promote_types(scores.dtype, torch.float32)
    if row_has_key is not None:
        scores = torch.where(row_has_key, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    probs = torch.softmax(scores, dim=-1, dtype=dtype)
    if row_has_key is not None:
        probs = probs * row_has_key
    return probs


def reference_relbias_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_bias_table: Tensor | None = None,
    *,
    bidirectional: bool = True,
    max_distance: int = 128,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    q_offset: int | Tensor = 0,
    scale: float = 1.0,
) -> Tensor:
    """`softmax(q k^T * scale + bias + mask) v` with q `[B,H,Q,d]`, k/v `[B,H,K,d]` -> `[B,H,Q,d]`.

    Matmuls run in the input dtype, the softmax in fp32. Differentiable in q, k, v and the table.
    """
    q_len, k_len = q.shape[-2], k.shape[-2]
    bias = None
    if rel_bias_table is not None:
        bias = position_bias(
            rel_bias_table, q_len, k_len, bidirectional=bidirectional, max_distance=max_distance, q_offset=q_offset
        )
    allowed = allowed_keys(key_padding_mask, q_len, k_len, causal=causal, q_offset=q_offset, device=q.device)
    scores = torch.matmul(q, k.transpose(-1, -2))
    if scale != 1.0:
        scores = scores * scale
    dtype = torch.promote_types(scores.dtype, torch.float32)
    additive = bias_and_mask(
        bias, key_padding_mask, q_len, k_len, causal=causal, q_offset=q_offset, dtype=dtype, device=q.device
    )
    if additive is not None:
        scores = scores + additive
    probs = masked_softmax(scores, rows_with_keys(allowed))
    return torch.matmul(probs.to(v.dtype), v)
