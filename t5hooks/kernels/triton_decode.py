"""Decode path: a few query rows against a long KV cache, split over the keys (flash-decoding).

With one query per (batch, head) the forward kernel would run one program per (batch, head),
each streaming the whole cache alone. Here the keys are cut into `n_splits` contiguous chunks:

1. `_decode_split_kernel`, one program per (query row, chunk): online softmax over its chunk with
   vector math (a single row is too thin for tensor cores; the step is bound by reading K and V),
   writing its running max `m_s`, sum `l_s` and unnormalised output `acc_s` (fp32).
2. `_decode_combine_kernel`, one program per query row: `M = max_s m_s`,
   `out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s`, logsumexp `M + log2(sum ...)`.

The bias of key j is gathered from the per-distance vector at `clamp(j - i - q_offset)`; padding
and causal limits shrink each chunk's range, so chunks past the last visible key do no work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .tiles import launch_options, tiles
from .triton_common import LN2, LOG2E, head_base, head_bias, optional_inputs, row_strides, visible_keys

#: Queries per (batch, head) up to which `relbias_attention` takes this path instead of the forward kernel.
DECODE_MAX_QUERIES = 4


@triton.jit
def _decode_split_kernel(
    Q,  # [B,H,Q,d]
    K,  # [B,H,K,d]
    V,  # [B,H,K,d]
    BiasByDistance,  # [H, 2*bound+1] fp32, log2 units
    KeyMask,  # [B,K] int8
    KeyRanges,  # [B,2] int32
    PartAcc,  # [B*H*Q, n_splits, d] fp32
    PartMax,  # [B*H*Q, n_splits] fp32 (log2 units)
    PartSum,  # [B*H*Q, n_splits] fp32
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    n_heads, q_len, k_len, q_offset, bound, scale, keys_per_split,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # (b*H + h)*Q + i
    split = tl.program_id(1)
    i = row % q_len
    b = row // q_len // n_heads
    h = row // q_len % n_heads
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptr = head_base(Q, b, h, stride_qb, stride_qh) + i.to(tl.int64) * stride_qm
    q = tl.load(q_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)  # [D]
    q_pos = i + q_offset
    k_base = head_base(K, b, h, stride_kb, stride_kh)
    v_base = head_base(V, b, h, stride_vb, stride_vh)
    bias_row, _, _ = head_bias(BiasByDistance, h, bound, False)  # every key gathers its own bias here

    kv_lo, kv_hi = visible_keys(KeyRanges, b, k_len, HAS_KPM)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, k_len)
    if HAS_KPM:
        lo = tl.maximum(lo, kv_lo)
        hi = tl.minimum(hi, kv_hi)
    if CAUSAL:
        hi = tl.minimum(hi, q_pos + 1)

    m_i = tl.full([], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        k_pos = start_n + offs_n  # [BN]
        key_ok = k_pos < hi
        kv_ok = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + k_pos[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)  # [BN,D]
        v = tl.load(v_base + k_pos[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)  # [BN,D]
        s = tl.sum(k.to(tl.float32) * q[None, :], 1) * (scale * LOG2E)  # [BN], log2 units
        if HAS_BIAS:
            distance = tl.minimum(tl.maximum(k_pos - q_pos, -bound), bound)
            s += tl.load(bias_row + bound + distance)
        if HAS_KPM:
            key_ok = key_ok & (tl.load(KeyMask + b.to(tl.int64) * k_len + k_pos, mask=key_ok, other=0) != 0)
        s = tl.where(key_ok, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe)  # [BN]
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)  # [D]
        m_i = m_new

    part = row.to(tl.int64) * tl.num_programs(1) + split
    tl.store(PartAcc + part * HEAD_DIM + offs_d, acc, mask=d_ok)
    tl.store(PartMax + part, m_i)
    tl.store(PartSum + part, l_i)


@triton.jit
def _decode_combine_kernel(
    PartAcc,  # [B*H*Q, n_splits, d] fp32
    PartMax,  # [B*H*Q, n_splits] fp32
    PartSum,  # [B*H*Q, n_splits] fp32
    Out,  # [B,H,Q,d] contiguous
    Lse,  # [B,H,Q] fp32
    n_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_splits
    d_ok = offs_d < HEAD_DIM
    part = row * n_splits + offs_s  # [S]
    m = tl.load(PartMax + part, mask=s_ok, other=float("-inf"))  # [S]
    l = tl.load(PartSum + part, mask=s_ok, other=0.0)  # [S]
    acc = tl.load(PartAcc + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)

    m_all = tl.max(m, 0)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp2(m - m_safe)  # [S]; 0 for chunks that saw nothing
    l_all = tl.sum(w * l, 0)
    acc_all = tl.sum(w[:, None] * acc, 0)  # [D]
    seen = l_all > 0.0
    out = acc_all / tl.where(seen, l_all, 1.0)
    lse = tl.where(seen, (m_safe + tl.log2(tl.where(seen, l_all, 1.0))) * LN2, float("inf"))
    tl.store(Out + row * HEAD_DIM + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)
    tl.store(Lse + row, lse)


def decode_config(head_dim: int, interpreted: bool) -> dict:
    """Keys per tile (see tiles.TILES): 16 KiB of bf16 K per tile at d=64 and d=128; 16 in the interpreter."""
    return tiles("decode", head_dim, torch.bfloat16, interpreted)


def num_splits(rows: int, k_len: int, block_n: int, programs_target: int) -> tuple[int, int]:
    """Split the keys so that `rows * n_splits` programs fill the GPU: returns (n_splits, keys_per_split)."""
    key_blocks = triton.cdiv(k_len, block_n)
    splits = max(1, min(key_blocks, triton.cdiv(programs_target, rows)))
    keys_per_split = triton.cdiv(key_blocks, splits) * block_n
    return triton.cdiv(k_len, keys_per_split), keys_per_split


def launch_decode(
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
    """Split-K attention for short queries. Returns out `[B,H,Q,d]` and logsumexp `[B,H,Q]` (fp32)."""
    batch, n_heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    cfg = decode_config(head_dim, interpreted)
    rows = batch * n_heads * q_len
    target = cfg["programs_target"]
    if target is None:  # about four programs per SM
        target = 4 * torch.cuda.get_device_properties(q.device).multi_processor_count
    splits, keys_per_split = num_splits(rows, k_len, cfg["BLOCK_N"], target)

    part_acc = torch.empty((rows, splits, head_dim), dtype=torch.float32, device=q.device)
    part_max = torch.empty((rows, splits), dtype=torch.float32, device=q.device)
    part_sum = torch.empty((rows, splits), dtype=torch.float32, device=q.device)
    torch.library.wrap_triton(_decode_split_kernel)[(rows, splits)](
        *optional_inputs(q.device, q, k, v, bias_by_distance, key_mask, key_ranges), part_acc, part_max, part_sum,
        *row_strides(q, k, v), n_heads, q_len, k_len, q_offset, bound, scale, keys_per_split,
        HEAD_DIM=head_dim, BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"],
        HAS_BIAS=bias_by_distance is not None, HAS_KPM=key_mask is not None, CAUSAL=causal,
        **launch_options(cfg),
    )  # fmt: skip

    out = torch.empty((batch, n_heads, q_len, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_heads, q_len), dtype=torch.float32, device=q.device)
    torch.library.wrap_triton(_decode_combine_kernel)[(rows,)](
        part_acc, part_max, part_sum, out, lse, splits,
        HEAD_DIM=head_dim, BLOCK_D=cfg["BLOCK_D"], SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
        **launch_options(tiles("combine", head_dim, q.dtype, interpreted)),
    )  # fmt: skip
    return out, lse
