"""`backend="sdpa"`: T5 attention through `torch.nn.functional.scaled_dot_product_attention`.

PyTorch's SDPA has no notion of T5's bucketed position bias, but it takes an additive float
mask. This backend builds the `[B|1, H|1, Q, K]` term "position bias + mask" with the same
reference pieces the materialised path uses (`position_bias`, `allowed_keys`, `bias_and_mask`)
and hands it to SDPA, whose CPU kernel (blocked, online softmax) never materialises the
`[B,H,Q,K]` probabilities in memory. It is what a fused layer runs on CPU (see `policy.py`).

Differences from SDPA's own conventions, made to match the reference exactly:

* padding keys get the dtype's most negative finite value and keys after the query `-inf` (as the reference);
* a query row that sees no key at all comes out as zeros (SDPA would average all values);
* T5 does not scale scores by `1/sqrt(d)`: `scale` is passed explicitly (1.0 for T5).

Gradients flow to q, k, v and the bias table (through the additive term).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .reference import allowed_keys, bias_and_mask, position_bias, rows_with_keys


def sdpa_relbias_attention(
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
    """`softmax(q k^T * scale + bias + mask) v` via SDPA: q `[B,H,Q,d]`, k/v `[B,H,K,d]` -> `[B,H,Q,d]`.

    Arguments as `reference_relbias_attention` (already checked by `relbias_attention`).
    """
    q_len, k_len = q.shape[-2], k.shape[-2]
    bias = None
    if rel_bias_table is not None:
        bias = position_bias(  # [1,H,Q,K]
            rel_bias_table, q_len, k_len, bidirectional=bidirectional, max_distance=max_distance, q_offset=q_offset
        )
    allowed = allowed_keys(key_padding_mask, q_len, k_len, causal=causal, q_offset=q_offset, device=q.device)
    additive = bias_and_mask(  # [B|1, H|1, Q, K] or None; SDPA wants q's dtype
        bias, key_padding_mask, q_len, k_len, causal=causal, q_offset=q_offset, dtype=q.dtype, device=q.device
    )
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=float(scale))
    row_has_key = rows_with_keys(allowed) if key_padding_mask is not None else None
    if row_has_key is not None:
        out = out * row_has_key  # [B,1,Q,1]: rows that see no key give zeros, as the reference
    return out
