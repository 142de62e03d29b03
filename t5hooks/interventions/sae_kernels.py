"""Sparse SAE training kernels: encode once densely, then touch only the active (token, feature) pairs.

An SAE training step in the dense formulation costs six `[N, d_in] x [d_in, d_sae]` GEMMs (SAELens: encode,
decode, their backward, and the input gradient that `x - b_dec` asks autograd for). Once features are sparse
(TopK, BatchTopK, a trained ReLU SAE), only the encoder's forward GEMM needs every pre-activation (to choose
the active set); everything else runs on the `nnz` active pairs:

* decode:  `x_hat[t] = sum_i w_i W_dec[c_i]` over the pairs of token t: `embedding_bag` with per-sample weights;
* its backward: `dL/dw_i = <G[t_i], W_dec[c_i]>` (a sampled dense-dense product, `sampled_addmm` on the CSR
  pattern) and `dL/dW_dec[j] = sum_{i: c_i = j} w_i G[t_i]` (an `embedding_bag` over the pairs sorted by feature);
* the encoder's backward: `dL/dW_enc[:, j] = sum_{i: c_i = j} g_i x_c[t_i]` (the same transposed bag),
  `dL/db_enc[j] = sum_{i: c_i = j} g_i` and, because `x` is data, `dL/db_dec = -W_enc dL/db_enc` (a mat-vec,
  where autograd would run a full GEMM for the input gradient).

Cost: one GEMM plus O(nnz * d_in) instead of six GEMMs. The dense formulation (`encode_dense`) keeps the
input-gradient saving (five GEMMs) and is used while features are dense (a young ReLU SAE). Both are exact: they compute the
same gradients as autograd on SAELens's formulas, up to float summation order (tests compare them).

The kernels compile: codes are plain tensors, and the two ATen kernels `torch.compile` cannot trace are custom ops,
so the compiled training step (`sae_objective.compiled_training_step`) runs these same kernels with static shapes.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class SparseCodes(NamedTuple):
    """The active (token, feature) pairs of a batch, sorted by token: pair i is `(rows[i], cols[i])`. Plain
    tensors of shapes fixed by the batch (a NamedTuple: `torch.compile` traces it), so the same kernels run
    eagerly and inside the compiled step.

    `offsets [N]` is where each token's pairs start (embedding_bag's bag offsets); `order [nnz]` lists the pairs
    sorted by feature and `feature_offsets [d_sae]` where each feature's run starts in that order (the
    transposed products of the backward)."""

    rows: Tensor  # [nnz] int64, non-decreasing
    cols: Tensor  # [nnz] int64
    offsets: Tensor  # [N]
    order: Tensor  # [nnz]
    feature_offsets: Tensor  # [d_sae]

    @staticmethod
    def from_pairs(rows: Tensor, cols: Tensor, n_tokens: int, n_features: int) -> SparseCodes:
        """Pairs sorted by token (`rows` non-decreasing) -> codes."""
        keys = cols.to(torch.int32) if n_features < 2**31 else cols  # int32 sorts several times faster
        order = torch.sort(keys, stable=True).indices
        return SparseCodes(rows, cols, _offsets(rows, n_tokens), order, _offsets(cols[order], n_features))

    @staticmethod
    def from_topk(indices: Tensor, n_features: int) -> SparseCodes:
        """`indices [N, k]` (feature ids per token, in any order) -> codes."""
        n, k = indices.shape
        rows = torch.arange(n, device=indices.device).repeat_interleave(k)
        return SparseCodes.from_pairs(rows, indices.reshape(-1), n, n_features)

    @staticmethod
    def from_mask(mask: Tensor, size: int | None = None) -> SparseCodes:
        """A boolean `[N, d_sae]` mask of active pairs -> codes (row-major order). With `size` the codes hold
        exactly `size` pairs (a static shape): the first `size` active pairs, then padding pairs on the last
        entry `(N - 1, d_sae - 1)`, which the caller must zero (the pairs past `mask.sum()`)."""
        n, m = mask.shape
        if size is None:
            flat = mask.reshape(-1).nonzero().squeeze(1)
        else:
            flat = torch.nonzero_static(mask.reshape(-1), size=size, fill_value=n * m - 1).squeeze(1)
        return SparseCodes.from_pairs(flat // m, flat % m, n, m)

    @property
    def n_tokens(self) -> int:
        return self.offsets.shape[0]

    @property
    def n_features(self) -> int:
        return self.feature_offsets.shape[0]

    def fired(self, acts: Tensor) -> Tensor:  # [d_sae] int64: pairs with a positive activation, per feature
        return torch.zeros(self.n_features, dtype=torch.long, device=self.cols.device).index_add_(
            0, self.cols, (acts > 0).long()
        )


def _offsets(sorted_ids: Tensor, n: int) -> Tensor:
    """Start of each id's run in a sorted id vector (`[n]`, exclusive cumulative counts)."""
    counts = torch.zeros(n, dtype=torch.long, device=sorted_ids.device).index_add_(
        0, sorted_ids, torch.ones_like(sorted_ids)
    )
    return torch.cumsum(counts, 0) - counts


# The two kernels `torch.compile` cannot trace (a CSR tensor; embedding_bag's weighted form) are custom ops: the
# compiled step calls the same ATen kernels as the eager one, and fuses the elementwise work around them.
@torch.library.custom_op("t5hooks::sae_bag_sum", mutates_args=())
def _bag(ids: Tensor, table: Tensor, offsets: Tensor, weights: Tensor) -> Tensor:
    """`out[b] = sum_{i in bag b} weights[i] * table[ids[i]]` (bags are runs starting at `offsets`): `[B, d]`."""
    return F.embedding_bag(ids, table, offsets, mode="sum", per_sample_weights=weights)


@_bag.register_fake
def _(ids: Tensor, table: Tensor, offsets: Tensor, weights: Tensor) -> Tensor:
    return table.new_empty(offsets.shape[0], table.shape[1])


@torch.library.custom_op("t5hooks::sae_sampled_dot", mutates_args=())
def _sampled_dot_op(left: Tensor, right: Tensor, offsets: Tensor, cols: Tensor) -> Tensor:
    """`[nnz]`: `<left[t], right[cols[i]]>` for pair i of token t (CSR pattern `offsets`, `cols`)."""
    crow = torch.cat([offsets, offsets.new_tensor([cols.shape[0]])])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        pattern = torch.sparse_csr_tensor(
            crow, cols, left.new_zeros(cols.shape[0]), (left.shape[0], right.shape[0]), check_invariants=False
        )
        return torch.sparse.sampled_addmm(pattern, left, right.T, beta=0.0).values().clone()


@_sampled_dot_op.register_fake
def _(left: Tensor, right: Tensor, offsets: Tensor, cols: Tensor) -> Tensor:
    return left.new_empty(cols.shape[0])


def _by_feature_sum(codes: SparseCodes, rows_table: Tensor, weights: Tensor) -> Tensor:
    """`out[j] = sum_{i: cols[i] = j} weights[i] * rows_table[rows[i]]`: `[d_sae, d]`, the transpose product
    `S^T @ rows_table` of the sparse matrix `S` holding `weights` on the pattern."""
    order = codes.order
    return _bag(codes.rows[order], rows_table, codes.feature_offsets, weights[order])


def _sampled_dot(codes: SparseCodes, left: Tensor, right: Tensor) -> Tensor:
    """`[nnz]`: `<left[rows[i]], right[cols[i]]>` for every pair (the entries of `left @ right.T` on the pattern)."""
    return _sampled_dot_op(left, right, codes.offsets, codes.cols)


class _PreActsAt(torch.autograd.Function):
    """Pre-activations at the active pairs, `pre[rows, cols]`, with gradients for W_enc, b_enc and b_dec that
    touch only those pairs. `pre` and `x_c = x - b_dec` were computed without autograd by `raw_pre_acts`.
    (The codes travel as their five tensors: autograd Functions take tensors.)"""

    @staticmethod
    def forward(ctx, pre: Tensor, x_c: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, *codes: Tensor):
        ctx.has_b_dec = b_dec is not None
        ctx.save_for_backward(x_c, W_enc, *codes)
        return pre[codes[0], codes[1]]

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad [nnz]
        x_c, W_enc, *saved = ctx.saved_tensors
        codes = SparseCodes(*saved)
        grad_W_enc = _by_feature_sum(codes, x_c, grad).T  # [d_in, d_sae]
        grad_b_enc = torch.zeros(codes.n_features, dtype=grad.dtype, device=grad.device).index_add_(0, codes.cols, grad)
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.has_b_dec else None
        return None, None, grad_W_enc, grad_b_enc, grad_b_dec, *(None,) * len(saved)


class _DenseEncode(torch.autograd.Function):
    """`pre = (x - b_dec) @ W_enc + b_enc` for data `x` (no input gradient): its backward runs one GEMM for W_enc
    and a mat-vec for b_dec, where autograd would add a GEMM for the gradient of `x - b_dec`."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None):
        pre, x_c = raw_pre_acts(x, W_enc, b_enc, b_dec)
        ctx.has_b_dec = b_dec is not None
        ctx.save_for_backward(x_c, W_enc)
        return pre

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad [N, d_sae]
        x_c, W_enc = ctx.saved_tensors
        grad_b_enc = grad.sum(0)
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.has_b_dec else None
        return None, x_c.T @ grad, grad_b_enc, grad_b_dec


class _SparseDecode(torch.autograd.Function):
    """`out[t] = sum_{i: rows[i] = t} w_i W_dec[cols[i]]`: `[N, d_in]` from `nnz` weighted decoder rows."""

    @staticmethod
    def forward(ctx, w: Tensor, W_dec: Tensor, *codes: Tensor):
        ctx.save_for_backward(w, W_dec, *codes)
        codes_ = SparseCodes(*codes)
        return _bag(codes_.cols, W_dec, codes_.offsets, w)

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad [N, d_in]
        w, W_dec, *saved = ctx.saved_tensors
        codes = SparseCodes(*saved)
        grad = grad.contiguous()
        grad_w = _sampled_dot(codes, grad, W_dec) if ctx.needs_input_grad[0] else None
        grad_W_dec = _by_feature_sum(codes, grad, w) if ctx.needs_input_grad[1] else None
        return grad_w, grad_W_dec, *(None,) * len(saved)


@torch.no_grad()
def raw_pre_acts(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None) -> tuple[Tensor, Tensor]:
    """`(pre [N, d_sae], x_c [N, d_in])` without autograd: the one dense GEMM of a step."""
    x_c = x - b_dec if b_dec is not None else x
    return torch.addmm(b_enc, x_c, W_enc), x_c


def encode_dense(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None) -> Tensor:
    """`(x - b_dec) @ W_enc + b_enc` for data `x`, `[N, d_sae]`, with the cheaper backward of `_DenseEncode`."""
    return _DenseEncode.apply(x, W_enc, b_enc, b_dec)


def encode_at(
    pre: Tensor, x_c: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, codes: SparseCodes
) -> Tensor:
    """`pre[rows, cols]` attached to autograd: `[nnz]`, gradients only through the active pairs."""
    return _PreActsAt.apply(pre, x_c, W_enc, b_enc, b_dec, *codes)


def decode_sparse(weights: Tensor, W_dec: Tensor, codes: SparseCodes) -> Tensor:
    """`S @ W_dec` for the sparse `[N, d_sae]` matrix `S` holding `weights [nnz]` on the pattern: `[N, d_in]`."""
    return _SparseDecode.apply(weights, W_dec, *codes)
