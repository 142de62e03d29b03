"""Triton building blocks shared by the forward, backward and decode kernels.

Conventions for all kernels of this package:

* Scores live in log2 units, `s = (q . k) * scale * log2(e) + bias * log2(e)`, so the softmax uses
  `exp2`; the saved logsumexp is in natural-log units.
* Query row i sits at absolute position `i + q_offset`; the signed distance of key j is
  `r = j - (i + q_offset)`. The bias is read from the per-head vector `bias_row[bound + clamp(r)]`
  (see `prep.py`), and a tile whose distances all lie at or beyond `bound` on one side gets one
  scalar bias ("far" tile). Tiles are visited in three ranges: keys far behind the queries, near
  the diagonal, keys far ahead; only near tiles gather the bias and apply the causal mask.
* A hidden score is `-inf`; a row with no visible key keeps max `-inf`, sum 0, and comes out as
  zeros with logsumexp `+inf` (so the backward recomputes `p = exp2(s - lse) = 0` for it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln(2): log(x) = log2(x) * LN2


@triton.jit
def cdiv(x, y):
    """Ceiling division of non-negative integers."""
    return (x + y - 1) // y


@triton.jit
def key_block_ranges(
    m0, q_offset, kv_lo, kv_hi, k_len, bound, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr
):
    """Key-block boundaries `lo <= near_lo <= near_hi <= hi` for the query rows `m0 .. m0+BLOCK_M-1`.

    `[lo, near_lo)`: every distance <= -bound (keys far behind every query; no causal mask needed),
    `[near_lo, near_hi)`: near the diagonal, `[near_hi, hi)`: every distance >= bound (far ahead).
    `hi` stops at the last visible key (padding range, causal limit of the last query row).
    """
    p_first = m0 + q_offset  # absolute position of the first query row
    p_last = p_first + BLOCK_M - 1
    hi = tl.minimum(k_len, kv_hi)
    if CAUSAL:
        hi = tl.minimum(hi, p_last + 1)
    lo = (kv_lo // BLOCK_N) * BLOCK_N
    # block [n, n+BLOCK_N) is far behind iff its last key is <= p_first - bound
    near_lo = cdiv(tl.maximum(p_first - bound - BLOCK_N + 2, 0), BLOCK_N) * BLOCK_N
    # block [n, n+BLOCK_N) is far ahead iff its first key is >= p_last + bound
    near_hi = cdiv(p_last + bound, BLOCK_N) * BLOCK_N
    near_lo = tl.minimum(tl.maximum(near_lo, lo), hi)
    near_hi = tl.minimum(tl.maximum(near_hi, near_lo), hi)
    return lo, near_lo, near_hi, hi


@triton.jit
def query_block_ranges(n0, q_offset, q_hi, bound, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Query-block boundaries `lo <= near_lo <= near_hi <= q_hi` for the keys `n0 .. n0+BLOCK_N-1`.

    `[lo, near_lo)`: every distance >= bound (keys far ahead of these queries), `[near_lo, near_hi)`:
    near, `[near_hi, q_hi)`: every distance <= -bound (keys far behind). Causal: `lo` skips queries
    that see none of these keys. `q_hi` is the query length, or 0 to visit nothing.
    """
    first_row = 0
    if CAUSAL:
        first_row = tl.maximum(n0 - q_offset, 0)  # first query row whose position reaches key n0
    lo = (first_row // BLOCK_M) * BLOCK_M
    # rows [m, m+BLOCK_M) see the keys far ahead iff n0 - (m + BLOCK_M - 1 + q_offset) >= bound
    near_lo = cdiv(tl.maximum(n0 - q_offset - bound - BLOCK_M + 2, 0), BLOCK_M) * BLOCK_M
    # rows [m, m+BLOCK_M) see the keys far behind iff n0 + BLOCK_N - 1 - (m + q_offset) <= -bound
    near_hi = cdiv(tl.maximum(n0 + BLOCK_N - 1 + bound - q_offset, 0), BLOCK_M) * BLOCK_M
    near_lo = tl.minimum(tl.maximum(near_lo, lo), q_hi)
    near_hi = tl.minimum(tl.maximum(near_hi, near_lo), q_hi)
    return lo, near_lo, near_hi, q_hi


@triton.jit
def biased_scores(
    s,
    q_pos,
    k_pos,
    key_ok,
    bias_row,
    far_bias,
    bound,
    NEAR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KEYS: tl.constexpr,
):
    """Add the relative-position bias to a score tile and hide what may not be seen (`-inf`).

    `s`: scores in log2 units; `q_pos`, `k_pos`: absolute positions broadcastable to `s`
    (`[BM,1]` and `[1,BN]`, or transposed); `key_ok`: broadcastable, key exists and is not padding;
    `far_bias`: the tile's single bias when it is not NEAR.
    """
    if HAS_BIAS:
        if NEAR:
            distance = tl.minimum(tl.maximum(k_pos - q_pos, -bound), bound)
            s = s + tl.load(bias_row + bound + distance)
        else:
            s = s + far_bias
    if MASK_KEYS:
        s = tl.where(key_ok, s, float("-inf"))
    if CAUSAL:
        if NEAR:  # far-behind tiles are entirely visible, far-ahead tiles are never visited
            s = tl.where(k_pos <= q_pos, s, float("-inf"))
    return s


@triton.jit
def load_key_ok(key_mask_row, k_pos, k_len, HAS_KPM: tl.constexpr):
    """Keys that exist (`k_pos < k_len`) and are not padding: bool, shape of `k_pos`."""
    ok = k_pos < k_len
    if HAS_KPM:
        ok = ok & (tl.load(key_mask_row + k_pos, mask=ok, other=0) != 0)
    return ok


@triton.jit
def key_tile_scores(
    q,
    q_pos,
    k_pos,
    keys,
    far_bias,
    NEAR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Load the K/V tile at key positions `k_pos` `[BN]` and score the query tile `q` `[BM,D]` (rows at
    positions `q_pos` `[BM]`) against it: returns k, v `[BN,D]` and `s = q k^T * scale + bias`, masked,
    `[BM,BN]` in log2 units (shared by the forward pass and the dQ pass, which recomputes the same scores).
    `keys` is the program's `key_context`."""
    k_base, v_base, stride_kn, stride_vn, key_mask_row, bias_row, offs_d, k_len, bound, scale_log2e = keys
    in_range = (k_pos < k_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_base + k_pos[:, None] * stride_kn + offs_d[None, :], mask=in_range, other=0.0)  # [BN,D]
    v = tl.load(v_base + k_pos[:, None] * stride_vn + offs_d[None, :], mask=in_range, other=0.0)  # [BN,D]
    key_ok = load_key_ok(key_mask_row, k_pos, k_len, HAS_KPM)  # [BN]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e  # [BM,BN]
    s = biased_scores(
        s, q_pos[:, None], k_pos[None, :], key_ok[None, :], bias_row, far_bias, bound,
        NEAR, HAS_BIAS, CAUSAL, MASK_KEYS,
    )  # fmt: skip
    return k, v, s


# ---- the prologue every kernel shares: which (batch, head) a program owns, where its rows start, which keys
# it may see and its head's bias --------------------------------------------------------------------------


@triton.jit
def head_program(n_heads):
    """(pid_bh, b, h) of a program whose second grid axis runs over batch * heads."""
    pid_bh = tl.program_id(1)
    return pid_bh, pid_bh // n_heads, pid_bh % n_heads


@triton.jit
def head_base(ptr, b, h, stride_b, stride_h):
    """Start of the `[rows, d]` matrix of batch `b`, head `h` in a `[B,H,rows,d]` tensor (int64 offsets)."""
    return ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def visible_keys(KeyRanges, b, k_len, HAS_KPM: tl.constexpr):
    """First visible key and last visible key + 1 of batch row `b` (all keys without a padding mask)."""
    kv_lo = 0
    kv_hi = k_len
    if HAS_KPM:
        kv_lo = tl.load(KeyRanges + 2 * b)
        kv_hi = tl.load(KeyRanges + 2 * b + 1)
    return kv_lo, kv_hi


@triton.jit
def head_bias(BiasByDistance, h, bound, HAS_BIAS: tl.constexpr):
    """Head `h`'s per-distance bias row and the single biases of far tiles: keys at distance <= -bound
    (behind) and >= bound (ahead)."""
    bias_row = BiasByDistance + h * (2 * bound + 1)
    behind = 0.0
    ahead = 0.0
    if HAS_BIAS:
        behind = tl.load(bias_row)
        ahead = tl.load(bias_row + 2 * bound)
    return bias_row, behind, ahead


@triton.jit
def key_context(K, V, KeyMask, bias_row, b, h, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                offs_d, k_len, bound, scale):  # fmt: skip
    """What every key tile of one (batch, head) program reads, as one tuple (see `key_tile_scores`)."""
    k_base = head_base(K, b, h, stride_kb, stride_kh)
    v_base = head_base(V, b, h, stride_vb, stride_vh)
    key_mask_row = KeyMask + b.to(tl.int64) * k_len
    return k_base, v_base, stride_kn, stride_vn, key_mask_row, bias_row, offs_d, k_len, bound, scale * LOG2E


# ---- launching ----------------------------------------------------------------------------------------------


def optional_inputs(device, *tensors):
    """The tensors, with a one-element placeholder standing in for each absent (None) one."""
    placeholder = torch.empty(1, dtype=torch.int32, device=device)
    return tuple(placeholder if t is None else t for t in tensors)


def row_strides(*tensors) -> tuple[int, ...]:
    """(batch, head, row) strides of each `[B,H,rows,d]` tensor, in order: the kernels' `stride_*b/h/m|n`."""
    return tuple(s for t in tensors for s in t.stride()[:3])
