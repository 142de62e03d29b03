"""Forward Triton kernel: FlashAttention-2 style online softmax with T5's relative-position bias.

One program owns `BLOCK_M` query rows of one (batch, head) and streams over key blocks of
`BLOCK_N` keys, keeping a running max `m`, sum `l` and unnormalised output `acc` in fp32:

    s   = q k^T * scale + bias(j - i - q_offset)         (log2 units, hidden keys -inf)
    m'  = max(m, rowmax(s));  p = exp2(s - m');  alpha = exp2(m - m')
    l'  = l * alpha + rowsum(p);  acc' = acc * alpha + p v

and finally writes `acc / l` and the logsumexp `m + log2(l)` (natural-log units) for the backward.
The key blocks are visited in three ranges (see `triton_common.key_block_ranges`): keys far behind
the queries (constant bias per head), near the diagonal (bias gathered per element, causal mask),
keys far ahead (constant bias). Key blocks outside the row's padding range and, when causal, after the
last query are never visited.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .tiles import launch_options, tiles
from .triton_common import (
    LN2,
    head_base,
    head_bias,
    head_program,
    key_block_ranges,
    key_context,
    key_tile_scores,
    optional_inputs,
    row_strides,
    visible_keys,
)


@triton.jit
def _attend_key_blocks(
    state,
    q,
    q_pos,
    keys,
    far_bias,
    start,
    stop,
    NEAR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of `state` = (acc `[BM,D]`, l `[BM]`, m `[BM]`) over the key blocks in `[start, stop)`."""
    acc, l_i, m_i = state
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        k, v, s = key_tile_scores(
            q, q_pos, start_n + offs_n, keys, far_bias,
            NEAR, HAS_BIAS, HAS_KPM, CAUSAL, MASK_KEYS, HEAD_DIM, DOT_PRECISION,
        )  # fmt: skip  # k, v [BN,D]; s [BM,BN]

        m_new = tl.maximum(m_i, tl.max(s, 1))  # [BM]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])  # [BM,BN]
        alpha = tl.exp2(m_i - m_safe)  # [BM]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _forward_kernel(
    Q,  # [B,H,Q,d]
    K,  # [B,H,K,d]
    V,  # [B,H,K,d]
    BiasByDistance,  # [H, 2*bound+1] fp32, log2 units (unused without bias)
    KeyMask,  # [B,K] int8 (unused without padding mask)
    KeyRanges,  # [B,2] int32: first visible key, last visible key + 1
    Out,  # [B,H,Q,d] contiguous
    Lse,  # [B,H,Q] fp32 contiguous
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    n_heads, q_len, k_len, q_offset, bound, scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    m0 = tl.program_id(0) * BLOCK_M
    pid_bh, b, h = head_program(n_heads)
    offs_m = m0 + tl.arange(0, BLOCK_M)  # query rows
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_base = head_base(Q, b, h, stride_qb, stride_qh)
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_ok, other=0.0)  # [BM,D]
    q_pos = offs_m + q_offset  # [BM] absolute positions
    bias_row, bias_behind, bias_ahead = head_bias(BiasByDistance, h, bound, HAS_BIAS)
    keys = key_context(K, V, KeyMask, bias_row, b, h, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                       stride_vn, offs_d, k_len, bound, scale)  # fmt: skip
    kv_lo, kv_hi = visible_keys(KeyRanges, b, k_len, HAS_KPM)
    lo, near_lo, near_hi, hi = key_block_ranges(m0, q_offset, kv_lo, kv_hi, k_len, bound, BLOCK_M, BLOCK_N, CAUSAL)

    # the loops: keys far behind (one bias), near the diagonal (gathered bias, causal mask), far ahead
    state = (
        tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),  # acc
        tl.zeros([BLOCK_M], dtype=tl.float32),  # l
        tl.full([BLOCK_M], float("-inf"), dtype=tl.float32),  # m
    )
    state = _attend_key_blocks(state, q, q_pos, keys, bias_behind, lo, near_lo,
                               False, HAS_BIAS, HAS_KPM, CAUSAL, MASK_KEYS, HEAD_DIM, BLOCK_N, DOT_PRECISION)  # fmt: skip
    state = _attend_key_blocks(state, q, q_pos, keys, 0.0, near_lo, near_hi,
                               True, HAS_BIAS, HAS_KPM, CAUSAL, MASK_KEYS, HEAD_DIM, BLOCK_N, DOT_PRECISION)  # fmt: skip
    state = _attend_key_blocks(state, q, q_pos, keys, bias_ahead, near_hi, hi,
                               False, HAS_BIAS, HAS_KPM, CAUSAL, MASK_KEYS, HEAD_DIM, BLOCK_N, DOT_PRECISION)  # fmt: skip
    acc, l_i, m_i = state

    seen = l_i > 0.0  # rows with at least one visible key
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("inf"))
    row = pid_bh.to(tl.int64) * q_len + offs_m  # [BM] row index into [B*H*Q]
    tl.store(Out + row[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty), mask=q_ok)
    tl.store(Lse + row, lse, mask=offs_m < q_len)


def dot_precision(dtype: torch.dtype) -> str:
    """How fp32 tiles are multiplied, following `torch.get_float32_matmul_precision()` as the
    reference's `torch.matmul` does: "highest" (the default) -> true fp32, else TF32."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def launch_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias_by_distance: Tensor | None,
    key_mask: Tensor | None,
    key_ranges: Tensor | None,
    *,
    causal: bool,
    q_offset: int,
    bound: int,
    scale: float,
    interpreted: bool,
) -> tuple[Tensor, Tensor]:
    """Run the forward kernel. Returns out `[B,H,Q,d]` (q's dtype) and logsumexp `[B,H,Q]` (fp32)."""
    batch, n_heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    out = torch.empty((batch, n_heads, q_len, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_heads, q_len), dtype=torch.float32, device=q.device)
    cfg = tiles("forward", head_dim, q.dtype, interpreted)
    has_kpm = key_mask is not None
    grid = (triton.cdiv(q_len, cfg["BLOCK_M"]), batch * n_heads)
    torch.library.wrap_triton(_forward_kernel)[grid](
        *optional_inputs(q.device, q, k, v, bias_by_distance, key_mask, key_ranges), out, lse,
        *row_strides(q, k, v), n_heads, q_len, k_len, q_offset, bound, scale,
        HEAD_DIM=head_dim, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        HAS_BIAS=bias_by_distance is not None, HAS_KPM=has_kpm, CAUSAL=causal,
        MASK_KEYS=has_kpm or k_len % cfg["BLOCK_N"] != 0, DOT_PRECISION=dot_precision(q.dtype),
        **launch_options(cfg),
    )  # fmt: skip
    return out, lse
