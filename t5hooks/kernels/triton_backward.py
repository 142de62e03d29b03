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

from .tiles import launch_options, tiles
from .triton_common import (
    LOG2E,
    biased_scores,
    head_base,
    head_bias,
    head_program,
    key_block_ranges,
    key_context,
    key_tile_scores,
    load_key_ok,
    optional_inputs,
    query_block_ranges,
    row_strides,
    visible_keys,
)
from .triton_forward import dot_precision


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
    pid_bh, b, h = head_program(n_heads)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    row = pid_bh.to(tl.int64) * q_len + offs_m  # [BM] row index into [B*H*Q]
    o = tl.load(Out + row[:, None] * HEAD_DIM + offs_d[None, :], mask=ok, other=0.0)
    do_base = head_base(dOut, b, h, stride_dob, stride_doh)
    do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BM]
    tl.store(Delta + row, delta, mask=offs_m < q_len)


@triton.jit
def _dkdv_query_blocks(
    state,
    tile,
    queries,
    far_bias,
    start,
    stop,
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
    `state` = (dk, dv, d_buckets, d_far): `d_buckets` `[BUCKETS_PAD]` collects near tiles per bucket, `d_far`
    (scalar) far tiles. `tile` = (k, v, k_pos, key_ok, offs_d) of this program's keys; `queries` = where the query-side
    rows start and the shared scalars (see `_dkdv_kernel`).
    """
    dk, dv, d_buckets, d_far = state
    k, v, k_pos, key_ok, offs_d = tile
    (
        q_base,
        do_base,
        lse_base,
        delta_base,
        stride_qm,
        stride_dom,
        bias_row,
        bucket_row,
        q_len,
        q_offset,
        bound,
        scale_log2e,
    ) = queries
    offs_m = tl.arange(0, BLOCK_M)
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
    pid_bh, b, h = head_program(n_heads)
    k_pos = n0 + tl.arange(0, BLOCK_N)  # [BN]
    offs_d = tl.arange(0, BLOCK_D)
    kd_ok = (k_pos < k_len)[:, None] & (offs_d < HEAD_DIM)[None, :]

    k_base = head_base(K, b, h, stride_kb, stride_kh)
    v_base = head_base(V, b, h, stride_vb, stride_vh)
    k = tl.load(k_base + k_pos[:, None] * stride_kn + offs_d[None, :], mask=kd_ok, other=0.0)  # [BN,D]
    v = tl.load(v_base + k_pos[:, None] * stride_vn + offs_d[None, :], mask=kd_ok, other=0.0)  # [BN,D]
    key_ok = load_key_ok(KeyMask + b.to(tl.int64) * k_len, k_pos, k_len, HAS_KPM)  # [BN]
    bias_row, bias_behind, bias_ahead = head_bias(BiasByDistance, h, bound, HAS_BIAS)
    queries = (
        head_base(Q, b, h, stride_qb, stride_qh), head_base(dOut, b, h, stride_dob, stride_doh),
        Lse + pid_bh.to(tl.int64) * q_len, Delta + pid_bh.to(tl.int64) * q_len, stride_qm, stride_dom,
        bias_row, BucketByDistance, q_len, q_offset, bound, scale * LOG2E,  # scores in log2 units, for exp2
    )  # fmt: skip
    kv_lo, kv_hi = visible_keys(KeyRanges, b, k_len, HAS_KPM)
    q_hi = q_len
    if HAS_KPM:  # a key block outside the row's visible range gets no gradient: skip every query
        q_hi = tl.where((n0 < kv_hi) & (n0 + BLOCK_N > kv_lo), q_len, 0)
    lo, near_lo, near_hi, hi = query_block_ranges(n0, q_offset, q_hi, bound, BLOCK_M, BLOCK_N, CAUSAL)

    # the loops: queries these keys are far ahead of (one bias), near ones (per-bucket sums), far behind
    tile = (k, v, k_pos, key_ok, offs_d)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    d_buckets = tl.zeros([BUCKETS_PAD], dtype=tl.float32)
    d_ahead = tl.zeros([], dtype=tl.float32)  # these keys are far ahead of queries in [lo, near_lo)
    d_behind = tl.zeros([], dtype=tl.float32)  # these keys are far behind queries in [near_hi, hi)
    dk, dv, d_buckets, d_ahead = _dkdv_query_blocks((dk, dv, d_buckets, d_ahead), tile, queries, bias_ahead, lo,
        near_lo, False, HAS_BIAS, CAUSAL, MASK_KEYS, HEAD_DIM, BLOCK_M, BUCKETS_PAD, DOT_PRECISION)  # fmt: skip
    dk, dv, d_buckets, _ = _dkdv_query_blocks((dk, dv, d_buckets, 0.0), tile, queries, 0.0, near_lo,
        near_hi, True, HAS_BIAS, CAUSAL, MASK_KEYS, HEAD_DIM, BLOCK_M, BUCKETS_PAD, DOT_PRECISION)  # fmt: skip
    dk, dv, d_buckets, d_behind = _dkdv_query_blocks((dk, dv, d_buckets, d_behind), tile, queries, bias_behind,
        near_hi, hi, False, HAS_BIAS, CAUSAL, MASK_KEYS, HEAD_DIM, BLOCK_M, BUCKETS_PAD, DOT_PRECISION)  # fmt: skip

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
    rows,
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
    """Accumulate dQ `[BM,D]` (unscaled) over the key blocks in `[start, stop)`. `rows` = (q, dO, logsumexp in
    log2 units, delta, positions) of this program's query rows; `keys` its `key_context`."""
    q, do, lse2, delta, q_pos = rows
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        k, v, s = key_tile_scores(
            q, q_pos, start_n + offs_n, keys, far_bias,
            NEAR, HAS_BIAS, HAS_KPM, CAUSAL, MASK_KEYS, HEAD_DIM, DOT_PRECISION,
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
    pid_bh, b, h = head_program(n_heads)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    qd_ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]

    q_base = head_base(Q, b, h, stride_qb, stride_qh)
    do_base = head_base(dOut, b, h, stride_dob, stride_doh)
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=qd_ok, other=0.0)  # [BM,D]
    do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=qd_ok, other=0.0)  # [BM,D]
    row = pid_bh.to(tl.int64) * q_len + offs_m  # [BM] row index into [B*H*Q]
    lse2 = tl.load(Lse + row, mask=row_ok, other=float("inf")) * LOG2E  # [BM], log2 units
    delta = tl.load(Delta + row, mask=row_ok, other=0.0)  # [BM]
    rows = (q, do, lse2, delta, offs_m + q_offset)
    bias_row, bias_behind, bias_ahead = head_bias(BiasByDistance, h, bound, HAS_BIAS)
    keys = key_context(K, V, KeyMask, bias_row, b, h, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                       stride_vn, offs_d, k_len, bound, scale)  # fmt: skip
    kv_lo, kv_hi = visible_keys(KeyRanges, b, k_len, HAS_KPM)
    lo, near_lo, near_hi, hi = key_block_ranges(m0, q_offset, kv_lo, kv_hi, k_len, bound, BLOCK_M, BLOCK_N, CAUSAL)

    # the loops: keys far behind (one bias), near the diagonal (gathered bias, causal mask), far ahead
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_key_blocks(dq, rows, keys, bias_behind, lo, near_lo,
                        False, HAS_BIAS, HAS_KPM, CAUSAL, MASK_KEYS, HEAD_DIM, BLOCK_N, DOT_PRECISION)  # fmt: skip
    dq = _dq_key_blocks(dq, rows, keys, 0.0, near_lo, near_hi,
                        True, HAS_BIAS, HAS_KPM, CAUSAL, MASK_KEYS, HEAD_DIM, BLOCK_N, DOT_PRECISION)  # fmt: skip
    dq = _dq_key_blocks(dq, rows, keys, bias_ahead, near_hi, hi,
                        False, HAS_BIAS, HAS_KPM, CAUSAL, MASK_KEYS, HEAD_DIM, BLOCK_N, DOT_PRECISION)  # fmt: skip
    tl.store(dQ + row[:, None] * HEAD_DIM + offs_d[None, :], (dq * scale).to(dQ.dtype.element_ty), mask=qd_ok)


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
    has_bias = bias_by_distance is not None
    has_kpm = key_mask is not None
    bias_arg, bucket_arg, mask_arg, ranges_arg = optional_inputs(
        q.device, bias_by_distance, bucket_by_distance if has_bias else None, key_mask, key_ranges
    )
    strides = row_strides(q, k, v, grad_out)
    flags = dict(HAS_BIAS=has_bias, HAS_KPM=has_kpm, CAUSAL=causal, DOT_PRECISION=dot_precision(q.dtype))

    delta = torch.empty((batch, n_heads, q_len), dtype=torch.float32, device=q.device)
    cfg = tiles("delta", head_dim, q.dtype, interpreted)
    torch.library.wrap_triton(_delta_kernel)[(triton.cdiv(q_len, cfg["BLOCK_M"]), batch * n_heads)](
        out, grad_out, delta, *row_strides(grad_out), n_heads, q_len,
        HEAD_DIM=head_dim, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], **launch_options(cfg),
    )  # fmt: skip

    cfg = tiles("dkdv", head_dim, q.dtype, interpreted, q.device)
    key_blocks = triton.cdiv(k_len, cfg["BLOCK_N"])
    dk = torch.empty((batch, n_heads, k_len, head_dim), dtype=k.dtype, device=q.device)
    dv = torch.empty((batch, n_heads, k_len, head_dim), dtype=v.dtype, device=q.device)
    d_bucket_partial = (
        torch.empty((batch, n_heads, key_blocks, num_buckets), dtype=torch.float32, device=q.device)
        if has_bias
        else bias_arg
    )
    torch.library.wrap_triton(_dkdv_kernel)[(key_blocks, batch * n_heads)](
        q, k, v, grad_out, lse, delta, bias_arg, bucket_arg, mask_arg, ranges_arg, dk, dv, d_bucket_partial,
        *strides, n_heads, q_len, k_len, q_offset, bound, scale, num_buckets,
        HEAD_DIM=head_dim, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BUCKETS_PAD=triton.next_power_of_2(num_buckets), MASK_KEYS=has_kpm or k_len % cfg["BLOCK_N"] != 0,
        **flags, **launch_options(cfg),
    )  # fmt: skip

    cfg = tiles("dq", head_dim, q.dtype, interpreted)
    dq = torch.empty((batch, n_heads, q_len, head_dim), dtype=q.dtype, device=q.device)
    torch.library.wrap_triton(_dq_kernel)[(triton.cdiv(q_len, cfg["BLOCK_M"]), batch * n_heads)](
        q, k, v, grad_out, lse, delta, bias_arg, mask_arg, ranges_arg, dq,
        *strides, n_heads, q_len, k_len, q_offset, bound, scale,
        HEAD_DIM=head_dim, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        MASK_KEYS=has_kpm or k_len % cfg["BLOCK_N"] != 0, **flags, **launch_options(cfg),
    )  # fmt: skip

    d_table = d_bucket_partial.sum(dim=(0, 2)).t() if has_bias else None  # fixed-order reduction -> [NB,H]
    return dq, dk, dv, d_table
