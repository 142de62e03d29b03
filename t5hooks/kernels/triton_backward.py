"""Backward Triton kernels: dQ, dK, dV and the gradient of the bucket table.

With `s = q k^T * scale + bias`, `p = softmax(s)` (recomputed from the saved logsumexp) and
`delta_i = sum_d dO[i,d] O[i,d]`:

    dV = p^T dO        dP = dO V^T        dS = p * (dP - delta)
    dK = scale * dS^T Q        dQ = scale * dS K        dTable[b, h] = sum over (i, j) in bucket b of dS

Three launches, none with atomics, so every gradient is bit-identical from run to run:

1. `_delta_kernel`: `delta = rowsum(dO * O)` in fp32.
2. `_dkdv_kernel`: one program per (key block, batch, head) keeps its K and V tile and dK, dV
   accumulators and streams over the query blocks that can see it. It also owns the table
   gradient of its tiles (the dTable scheme):
     * far tiles (all distances >= bound, or all <= -bound) have one bucket: their whole dS tile
       reduces with a single `tl.sum` into one of two scalar accumulators;
     * near tiles gather the bucket id of each element from the per-distance bucket vector and,
       for each bucket id present in the tile (a dynamic range `min .. max`), add the masked sum
       of dS to a `[num_buckets]` register accumulator.
   At the end the program writes its `[num_buckets]` partial sums (fp32) to its own row of a
   scratch buffer `[B, H, key_blocks, num_buckets]`; `torch.sum` over batch and key blocks, in a
   fixed order, gives dTable. No atomics, so no run-to-run variation.
3. `_dq_kernel`: one program per (query block, batch, head) streams over key blocks as the forward
   does and accumulates dQ (recomputing p and dP instead of sharing them through atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import LOG2E, biased_scores, key_block_ranges, key_tile_scores, load_key_ok, query_block_ranges
from .triton_forward import COMPILE_OPTIONS, dot_precision


@triton.jit
def _delta_kernel(
    Out,  # [B,H,Q,d] contiguous
    dOut,  # [B,H,Q,d]
    Delta,  # [B,H,Q] fp32
    stride_dob, stride_doh, stride_dom,
    n_heads, q_len,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    row = pid_bh.to(tl.int64) * q_len + offs_m  # [BM] row index into [B*H*Q]
    o = tl.load(Out + row[:, None] * HEAD_DIM + offs_d[None, :], mask=ok, other=0.0)
    do_base = dOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BM]
    tl.store(Delta + row, delta, mask=offs_m < q_len)


@triton.jit
def _dkdv_query_blocks(
    dk,
    dv,
    d_buckets,
    d_far,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qm,
    stride_dom,
    k_pos,
    key_ok,
    bias_row,
    bucket_row,
    far_bias,
    offs_m,
    offs_d,
    start,
    stop,
    q_len,
    q_offset,
    bound,
    scale_log2e,
    NEAR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BUCKETS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK, dV `[BN,D]` and the table gradient over the query blocks in `[start, stop)`.

    Tiles are transposed, `[BN keys, BM queries]`, so the K/V-side products need no transposes.
    `d_buckets` `[BUCKETS_PAD]` collects near tiles per bucket; `d_far` (scalar) collects far tiles.
    """
    d_ok = offs_d < HEAD_DIM
    bucket_ids = tl.arange(0, BUCKETS_PAD)
    for start_m in range(start, stop, BLOCK_M):
        rows = start_m + offs_m  # [BM]
        row_ok = rows < q_len
        qd_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=qd_ok, other=0.0)  # [BM,D]
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=qd_ok, other=0.0)  # [BM,D]
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * LOG2E  # [BM], log2 units
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)  # [BM]
        q_pos = rows + q_offset

        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2e  # [BN,BM]
        s_t = biased_scores(
            s_t, q_pos[None, :], k_pos[:, None], key_ok[:, None], bias_row, far_bias, bound,
            NEAR, HAS_BIAS, CAUSAL, MASK_KEYS,
        )  # fmt: skip
        p_t = tl.exp2(s_t - lse2[None, :])  # [BN,BM]; 0 where hidden and for rows that see nothing
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)  # [BN,D]
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BN,BM]
        ds_t = p_t * (dp_t - delta[None, :])  # [BN,BM] gradient of the scores, fp32
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)  # [BN,D]

        if HAS_BIAS:
            if NEAR:
                distance = tl.minimum(tl.maximum(k_pos[:, None] - q_pos[None, :], -bound), bound)
                bucket = tl.load(bucket_row + bound + distance)  # [BN,BM] int32
                for b in range(tl.min(bucket), tl.max(bucket) + 1):
                    part = tl.sum(tl.where(bucket == b, ds_t, 0.0))
                    d_buckets += tl.where(bucket_ids == b, part, 0.0)
            else:
                d_far += tl.sum(ds_t)
    return dk, dv, d_buckets, d_far


@triton.jit
def _dkdv_kernel(
    Q, K, V,  # [B,H,Q,d], [B,H,K,d], [B,H,K,d]
    dOut,  # [B,H,Q,d]
    Lse, Delta,  # [B,H,Q] fp32 contiguous
    BiasByDistance,  # [H, 2*bound+1] fp32, log2 units
    BucketByDistance,  # [2*bound+1] int32
    KeyMask,  # [B,K] int8
    KeyRanges,  # [B,2] int32
    dK, dV,  # [B,H,K,d] contiguous
    dBucketPartial,  # [B,H,key_blocks,num_buckets] fp32
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    n_heads, q_len, k_len, q_offset, bound, scale, num_buckets,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BUCKETS_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    n0 = pid_n * BLOCK_N
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    k_pos = n0 + tl.arange(0, BLOCK_N)  # [BN]
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kd_ok = (k_pos < k_len)[:, None] & (offs_d < HEAD_DIM)[None, :]

    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    k = tl.load(k_base + k_pos[:, None] * stride_kn + offs_d[None, :], mask=kd_ok, other=0.0)  # [BN,D]
    v = tl.load(v_base + k_pos[:, None] * stride_vn + offs_d[None, :], mask=kd_ok, other=0.0)  # [BN,D]
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = dOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    lse_base = Lse + pid_bh.to(tl.int64) * q_len
    delta_base = Delta + pid_bh.to(tl.int64) * q_len
    scale_log2e = scale * LOG2E  # scores in log2 units, for exp2

    key_ok = load_key_ok(KeyMask + b.to(tl.int64) * k_len, k_pos, k_len, HAS_KPM)  # [BN]
    q_hi = q_len
    if HAS_KPM:  # a key block outside the row's visible range gets no gradient: skip every query
        kv_lo = tl.load(KeyRanges + 2 * b)
        kv_hi = tl.load(KeyRanges + 2 * b + 1)
        q_hi = tl.where((n0 < kv_hi) & (n0 + BLOCK_N > kv_lo), q_len, 0)
    lo, near_lo, near_hi, hi = query_block_ranges(n0, q_offset, q_hi, bound, BLOCK_M, BLOCK_N, CAUSAL)

    bias_row = BiasByDistance + h * (2 * bound + 1)
    bias_behind = 0.0
    bias_ahead = 0.0
    if HAS_BIAS:
        bias_behind = tl.load(bias_row)
        bias_ahead = tl.load(bias_row + 2 * bound)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    d_buckets = tl.zeros([BUCKETS_PAD], dtype=tl.float32)
    d_ahead = tl.zeros([], dtype=tl.float32)  # these keys are far ahead of queries in [lo, near_lo)
    d_behind = tl.zeros([], dtype=tl.float32)  # these keys are far behind queries in [near_hi, hi)
    dk, dv, d_buckets, d_ahead = _dkdv_query_blocks(
        dk, dv, d_buckets, d_ahead, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
        k_pos, key_ok, bias_row, BucketByDistance, bias_ahead, offs_m, offs_d, lo, near_lo,
        q_len, q_offset, bound, scale_log2e,
        False, HAS_BIAS, CAUSAL, MASK_KEYS, HEAD_DIM, BLOCK_M, BUCKETS_PAD, DOT_PRECISION,
    )  # fmt: skip
    dk, dv, d_buckets, _ = _dkdv_query_blocks(  # near tiles: per-bucket sums into d_buckets
        dk, dv, d_buckets, 0.0, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
        k_pos, key_ok, bias_row, BucketByDistance, 0.0, offs_m, offs_d, near_lo, near_hi,
        q_len, q_offset, bound, scale_log2e,
        True, HAS_BIAS, CAUSAL, MASK_KEYS, HEAD_DIM, BLOCK_M, BUCKETS_PAD, DOT_PRECISION,
    )  # fmt: skip
    dk, dv, d_buckets, d_behind = _dkdv_query_blocks(
        dk, dv, d_buckets, d_behind, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
        k_pos, key_ok, bias_row, BucketByDistance, bias_behind, offs_m, offs_d, near_hi, hi,
        q_len, q_offset, bound, scale_log2e,
        False, HAS_BIAS, CAUSAL, MASK_KEYS, HEAD_DIM, BLOCK_M, BUCKETS_PAD, DOT_PRECISION,
    )  # fmt: skip

    row = pid_bh.to(tl.int64) * k_len + k_pos  # [BN] row index into [B*H*K]
    tl.store(dK + row[:, None] * HEAD_DIM + offs_d[None, :], (dk * scale).to(dK.dtype.element_ty), mask=kd_ok)
    tl.store(dV + row[:, None] * HEAD_DIM + offs_d[None, :], dv.to(dV.dtype.element_ty), mask=kd_ok)
    if HAS_BIAS:
        bucket_ids = tl.arange(0, BUCKETS_PAD)
        bucket_ahead = tl.load(BucketByDistance + 2 * bound)
        bucket_behind = tl.load(BucketByDistance)
        d_buckets += tl.where(bucket_ids == bucket_ahead, d_ahead, 0.0)
        d_buckets += tl.where(bucket_ids == bucket_behind, d_behind, 0.0)
        partial_row = (pid_bh.to(tl.int64) * tl.num_programs(0) + pid_n) * num_buckets
        tl.store(dBucketPartial + partial_row + bucket_ids, d_buckets, mask=bucket_ids < num_buckets)


@triton.jit
def _dq_key_blocks(
    dq,
    q,
    do,
    lse2,
    delta,
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
    """Accumulate dQ `[BM,D]` (unscaled) over the key blocks in `[start, stop)`."""
    for start_n in range(start, stop, BLOCK_N):
        k, v, s = key_tile_scores(
            q, k_base, v_base, stride_kn, stride_vn, key_mask_row, bias_row, far_bias, q_pos, start_n + offs_n,
            offs_d, k_len, bound, scale_log2e, NEAR, HAS_BIAS, HAS_KPM, CAUSAL, MASK_KEYS, HEAD_DIM, DOT_PRECISION,
        )  # fmt: skip  # k, v [BN,D]; s [BM,BN]
        p = tl.exp2(s - lse2[:, None])  # [BM,BN]
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BM,BN]
        ds = p * (dp - delta[:, None])  # [BM,BN]
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)  # [BM,D]
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V,  # [B,H,Q,d], [B,H,K,d], [B,H,K,d]
    dOut,  # [B,H,Q,d]
    Lse, Delta,  # [B,H,Q] fp32 contiguous
    BiasByDistance,  # [H, 2*bound+1] fp32, log2 units
    KeyMask,  # [B,K] int8
    KeyRanges,  # [B,2] int32
    dQ,  # [B,H,Q,d] contiguous
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
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
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    qd_ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = dOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=qd_ok, other=0.0)  # [BM,D]
    do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=qd_ok, other=0.0)  # [BM,D]
    row = pid_bh.to(tl.int64) * q_len + offs_m  # [BM] row index into [B*H*Q]
    lse2 = tl.load(Lse + row, mask=row_ok, other=float("inf")) * LOG2E  # [BM], log2 units
    delta = tl.load(Delta + row, mask=row_ok, other=0.0)  # [BM]
    q_pos = offs_m + q_offset
    scale_log2e = scale * LOG2E  # scores in log2 units, for exp2
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

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
        bias_behind = tl.load(bias_row)
        bias_ahead = tl.load(bias_row + 2 * bound)
    lo, near_lo, near_hi, hi = key_block_ranges(m0, q_offset, kv_lo, kv_hi, k_len, bound, BLOCK_M, BLOCK_N, CAUSAL)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_key_blocks(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, key_mask_row, bias_row, bias_behind,
        q_pos, offs_n, offs_d, lo, near_lo, k_len, bound, scale_log2e,
        False, HAS_BIAS, HAS_KPM, CAUSAL, MASK_KEYS, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    dq = _dq_key_blocks(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, key_mask_row, bias_row, 0.0,
        q_pos, offs_n, offs_d, near_lo, near_hi, k_len, bound, scale_log2e,
        True, HAS_BIAS, HAS_KPM, CAUSAL, MASK_KEYS, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    dq = _dq_key_blocks(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, key_mask_row, bias_row, bias_ahead,
        q_pos, offs_n, offs_d, near_hi, hi, k_len, bound, scale_log2e,
        False, HAS_BIAS, HAS_KPM, CAUSAL, MASK_KEYS, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    tl.store(dQ + row[:, None] * HEAD_DIM + offs_d[None, :], (dq * scale).to(dQ.dtype.element_ty), mask=qd_ok)


def backward_config(head_dim: int, dtype: torch.dtype, device: torch.device, interpreted: bool) -> dict:
    """Tile sizes of the two main backward kernels (fixed, so dTable is reproducible across processes).

    16-bit inputs: `dkdv` holds 128 keys against 32-query tiles, `dq` 128 queries against 32-key
    tiles (the shapes of the Triton fused-attention tutorial), 8 warps: no register spills on
    sm_90 at d=64 and d=128; on sm_8x the d=128 `dkdv` needs 64-key tiles. fp32 inputs, the
    correctness path, use small tiles; the interpreter 16x16.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpreted:
        tiles = dict(dkdv=(16, 16), dq=(16, 16), num_warps=1, num_stages=1)
    elif dtype == torch.float32:
        tiles = dict(dkdv=(16, 32), dq=(32, 32), num_warps=4, num_stages=2)
    else:
        pre_hopper = torch.cuda.get_device_capability(device)[0] < 9
        tiles = dict(dkdv=(32, 64 if pre_hopper and block_d > 64 else 128), dq=(128, 32), num_warps=8, num_stages=3)
    tiles["BLOCK_D"] = block_d
    return tiles


def launch_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    bias_by_distance: Tensor | None,
    bucket_by_distance: Tensor | None,
    num_buckets: int,
    key_mask: Tensor | None,
    key_ranges: Tensor | None,
    *,
    causal: bool,
    q_offset: int,
    bound: int,
    scale: float,
    interpreted: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Run the three backward kernels. Returns dq, dk, dv (contiguous, input dtype) and the
    table gradient `[num_buckets, H]` in fp32 (None without a table)."""
    batch, n_heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    cfg = backward_config(head_dim, q.dtype, q.device, interpreted)
    block_d = cfg["BLOCK_D"]
    launch_opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **COMPILE_OPTIONS)
    has_bias = bias_by_distance is not None
    has_kpm = key_mask is not None
    placeholder = torch.empty(1, dtype=torch.int32, device=q.device)  # stands in for absent inputs
    bias_arg = bias_by_distance if has_bias else placeholder
    bucket_arg = bucket_by_distance if has_bias else placeholder
    mask_arg = key_mask if has_kpm else placeholder
    ranges_arg = key_ranges if has_kpm else placeholder
    strides = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
    )  # fmt: skip

    delta = torch.empty((batch, n_heads, q_len), dtype=torch.float32, device=q.device)
    delta_block = 16 if interpreted else 64
    torch.library.wrap_triton(_delta_kernel)[(triton.cdiv(q_len, delta_block), batch * n_heads)](
        out, grad_out, delta, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), n_heads, q_len,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=delta_block, **COMPILE_OPTIONS,
    )  # fmt: skip

    block_m, block_n = cfg["dkdv"]
    key_blocks = triton.cdiv(k_len, block_n)
    dk = torch.empty((batch, n_heads, k_len, head_dim), dtype=k.dtype, device=q.device)
    dv = torch.empty((batch, n_heads, k_len, head_dim), dtype=v.dtype, device=q.device)
    d_bucket_partial = (
        torch.empty((batch, n_heads, key_blocks, num_buckets), dtype=torch.float32, device=q.device)
        if has_bias
        else placeholder
    )
    torch.library.wrap_triton(_dkdv_kernel)[(key_blocks, batch * n_heads)](
        q, k, v, grad_out, lse, delta, bias_arg, bucket_arg, mask_arg, ranges_arg, dk, dv, d_bucket_partial,
        *strides, n_heads, q_len, k_len, q_offset, bound, scale, num_buckets,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        BUCKETS_PAD=triton.next_power_of_2(num_buckets),
        HAS_BIAS=has_bias, HAS_KPM=has_kpm, CAUSAL=causal,
        MASK_KEYS=has_kpm or k_len % block_n != 0,
        DOT_PRECISION=dot_precision(q.dtype), **launch_opts,
    )  # fmt: skip

    block_m, block_n = cfg["dq"]
    dq = torch.empty((batch, n_heads, q_len, head_dim), dtype=q.dtype, device=q.device)
    torch.library.wrap_triton(_dq_kernel)[(triton.cdiv(q_len, block_m), batch * n_heads)](
        q, k, v, grad_out, lse, delta, bias_arg, mask_arg, ranges_arg, dq,
        *strides, n_heads, q_len, k_len, q_offset, bound, scale,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_BIAS=has_bias, HAS_KPM=has_kpm, CAUSAL=causal,
        MASK_KEYS=has_kpm or k_len % block_n != 0,
        DOT_PRECISION=dot_precision(q.dtype), **launch_opts,
    )  # fmt: skip

    d_table = d_bucket_partial.sum(dim=(0, 2)).t() if has_bias else None  # fixed-order reduction -> [NB,H]
    return dq, dk, dv, d_table
