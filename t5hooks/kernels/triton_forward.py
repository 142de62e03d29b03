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

from .triton_common import LN2, LOG2E, key_block_ranges, key_tile_scores


@triton.jit
def _attend_key_blocks(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    key_mask_row,
    bias_row,
    far_bias,
    q_pos,
    offs_n,
    offs_d,
    start,
    stop,
    k_len,
    bound,
    scale_log2e,
    NEAR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of (acc `[BM,D]`, l `[BM]`, m `[BM]`) over the key blocks in `[start, stop)`."""
    for start_n in range(start, stop, BLOCK_N):
        k, v, s = key_tile_scores(
            q, k_base, v_base, stride_kn, stride_vn, key_mask_row, bias_row, far_bias, q_pos, start_n + offs_n,
            offs_d, k_len, bound, scale_log2e, NEAR, HAS_BIAS, HAS_KPM, CAUSAL, MASK_KEYS, HEAD_DIM, DOT_PRECISION,
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
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_m = m0 + tl.arange(0, BLOCK_M)  # query rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    q_ok = (offs_m < q_len)[:, None] & d_ok[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_ok, other=0.0)  # [BM,D]
    q_pos = offs_m + q_offset  # [BM] absolute positions
    scale_log2e = scale * LOG2E  # scores in log2 units, for exp2

    if HAS_KPM:
        kv_lo = tl.load(KeyRanges + 2 * b)
        kv_hi = tl.load(KeyRanges + 2 * b + 1)
    else:
        kv_lo = 0
        kv_hi = k_len
    key_mask_row = KeyMask + b.to(tl.int64) * k_len
    bias_row = BiasByDistance + h * (2 * bound + 1)
    bias_behind = 0.0
    bias_ahead = 0.0
    if HAS_BIAS:
        bias_behind = tl.load(bias_row)  # keys at distance <= -bound
        bias_ahead = tl.load(bias_row + 2 * bound)  # keys at distance >= bound

    lo, near_lo, near_hi, hi = key_block_ranges(m0, q_offset, kv_lo, kv_hi, k_len, bound, BLOCK_M, BLOCK_N, CAUSAL)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _attend_key_blocks(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, key_mask_row, bias_row, bias_behind,
        q_pos, offs_n, offs_d, lo, near_lo, k_len, bound, scale_log2e,
        False, HAS_BIAS, HAS_KPM, CAUSAL, MASK_KEYS, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _attend_key_blocks(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, key_mask_row, bias_row, 0.0,
        q_pos, offs_n, offs_d, near_lo, near_hi, k_len, bound, scale_log2e,
        True, HAS_BIAS, HAS_KPM, CAUSAL, MASK_KEYS, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _attend_key_blocks(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, key_mask_row, bias_row, bias_ahead,
        q_pos, offs_n, offs_d, near_hi, hi, k_len, bound, scale_log2e,
        False, HAS_BIAS, HAS_KPM, CAUSAL, MASK_KEYS, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip

    seen = l_i > 0.0  # rows with at least one visible key
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("inf"))
    row = pid_bh.to(tl.int64) * q_len + offs_m  # [BM] row index into [B*H*Q]
    tl.store(Out + row[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty), mask=q_ok)
    tl.store(Lse + row, lse, mask=offs_m < q_len)


#: Explicit, so numerics do not change with Triton's default (FMA contraction; Triton 3.10 flips it).
COMPILE_OPTIONS = dict(enable_fp_fusion=True)


def forward_config(head_dim: int, dtype: torch.dtype, interpreted: bool) -> dict:
    """Tile sizes and launch options (fixed, so results are reproducible across processes).

    16-bit inputs: 128-query tiles with 8 warps, 64 keys per tile at d<=64 and 32 at d=128
    (compiled for sm_90 and sm_80 these hold the fp32 accumulators without register spills and
    stay under A100's shared memory; 4 warps spill). fp32 inputs, the correctness path, use
    32x32 tiles (true-fp32 dot products are register-hungry: no spills at d=64, some at d=128).
    The interpreter gets 16x16 tiles so that short test sequences still span several tiles,
    near and far.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpreted:
        cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    elif dtype == torch.float32:
        cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=64 if block_d <= 64 else 32, num_warps=8, num_stages=3)
    return cfg | dict(BLOCK_D=block_d, **COMPILE_OPTIONS)


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
    cfg = forward_config(head_dim, q.dtype, interpreted)
    placeholder = torch.empty(1, dtype=torch.int32, device=q.device)  # stands in for absent inputs
    has_kpm = key_mask is not None
    grid = (triton.cdiv(q_len, cfg["BLOCK_M"]), batch * n_heads)
    torch.library.wrap_triton(_forward_kernel)[grid](
        q, k, v,
        placeholder if bias_by_distance is None else bias_by_distance,
        placeholder if key_mask is None else key_mask,
        placeholder if key_ranges is None else key_ranges,
        out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        n_heads, q_len, k_len, q_offset, bound, scale,
        HEAD_DIM=head_dim,
        HAS_BIAS=bias_by_distance is not None,
        HAS_KPM=has_kpm,
        CAUSAL=causal,
        MASK_KEYS=has_kpm or k_len % cfg["BLOCK_N"] != 0,
        DOT_PRECISION=dot_precision(q.dtype),
        **cfg,
    )  # fmt: skip
    return out, lse
