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
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class SparseCodes:
    """The active (token, feature) pairs of a batch, sorted by token: pair i is `(rows[i], cols[i])`.

    `offsets [N]` is where each token's pairs start (embedding_bag's bag offsets); `n_tokens`, `n_features`
    give the dense shape `[N, d_sae]`.
    """

    rows: Tensor  # [nnz] int64, non-decreasing
    cols: Tensor  # [nnz] int64
    n_tokens: int
    n_features: int

    @staticmethod
    def from_topk(indices: Tensor, n_features: int) -> SparseCodes:
        """`indices [N, k]` (feature ids per token, in any order) -> codes."""
        n, k = indices.shape
        cols = indices.reshape(-1)
        rows = torch.arange(n, device=indices.device).repeat_interleave(k)
        return SparseCodes(rows, cols, n, n_features)

    @staticmethod
    def from_mask(mask: Tensor) -> SparseCodes:
        """A boolean `[N, d_sae]` mask of active pairs -> codes (row-major order)."""
        rows, cols = mask.nonzero(as_tuple=True)
        return SparseCodes(rows, cols, mask.shape[0], mask.shape[1])

    @property
    def nnz(self) -> int:
        return self.rows.numel()

    @cached_property
    def offsets(self) -> Tensor:  # [N]
        return _offsets(self.rows, self.n_tokens)

    @cached_property
    def by_feature(self) -> tuple[Tensor, Tensor]:
        """(order [nnz]: the pairs sorted by feature, offsets [d_sae] of each feature's run in that order)."""
        keys = self.cols.to(torch.int32) if self.n_features < 2**31 else self.cols  # int32 sorts several times faster
        order = torch.sort(keys, stable=True).indices
        return order, _offsets(self.cols[order], self.n_features)

    def csr(self, values: Tensor) -> Tensor:
        """`[N, d_sae]` sparse CSR matrix with these values on the pattern."""
        crow = torch.cat([self.offsets, self.offsets.new_tensor([self.nnz])])
        return torch.sparse_csr_tensor(
            crow, self.cols, values, (self.n_tokens, self.n_features), check_invariants=False
        )

    def feature_counts(self) -> Tensor:  # [d_sae] active pairs per feature
        return torch.zeros(self.n_features, dtype=torch.long, device=self.cols.device).index_add_(
            0, self.cols, torch.ones_like(self.cols)
        )


def _offsets(sorted_ids: Tensor, n: int) -> Tensor:
    """Start of each id's run in a sorted id vector (`[n]`, exclusive cumulative counts)."""
    counts = torch.zeros(n, dtype=torch.long, device=sorted_ids.device).index_add_(
        0, sorted_ids, torch.ones_like(sorted_ids)
    )
    return torch.cumsum(counts, 0) - counts


def _bag(ids: Tensor, table: Tensor, offsets: Tensor, weights: Tensor) -> Tensor:
    """`out[b] = sum_{i in bag b} weights[i] * table[ids[i]]` (bags are runs starting at `offsets`)."""
    return F.embedding_bag(ids, table, offsets, mode="sum", per_sample_weights=weights)


def _by_feature_sum(codes: SparseCodes, rows_table: Tensor, weights: Tensor) -> Tensor:
    """`out[j] = sum_{i: cols[i] = j} weights[i] * rows_table[rows[i]]`: `[d_sae, d]`, the transpose product
    `S^T @ rows_table` of the sparse matrix `S` holding `weights` on the pattern."""
    order, offsets = codes.by_feature
    return _bag(codes.rows[order], rows_table, offsets, weights[order])


def _sampled_dot(codes: SparseCodes, left: Tensor, right: Tensor) -> Tensor:
    """`[nnz]`: `<left[rows[i]], right[cols[i]]>` for every pair (the entries of `left @ right.T` on the pattern)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        pattern = codes.csr(torch.zeros(codes.nnz, dtype=left.dtype, device=left.device))
        return torch.sparse.sampled_addmm(pattern, left, right.T, beta=0.0).values()


class _PreActsAt(torch.autograd.Function):
    """Pre-activations at the active pairs, `pre[rows, cols]`, with gradients for W_enc, b_enc and b_dec that
    touch only those pairs. `pre` and `x_c = x - b_dec` were computed without autograd by `encode_dense`."""

    @staticmethod
    def forward(ctx, pre: Tensor, x_c: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, codes: SparseCodes):
        ctx.codes = codes
        ctx.has_b_dec = b_dec is not None
        ctx.save_for_backward(x_c, W_enc)
        return pre[codes.rows, codes.cols]

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad [nnz]
        x_c, W_enc = ctx.saved_tensors
        codes: SparseCodes = ctx.codes
        grad_W_enc = _by_feature_sum(codes, x_c, grad).T  # [d_in, d_sae]
        grad_b_enc = torch.zeros(codes.n_features, dtype=grad.dtype, device=grad.device).index_add_(0, codes.cols, grad)
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.has_b_dec else None
        return None, None, grad_W_enc, grad_b_enc, grad_b_dec, None


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
    def forward(ctx, w: Tensor, W_dec: Tensor, codes: SparseCodes):
        ctx.codes = codes
        ctx.save_for_backward(w, W_dec)
        return _bag(codes.cols, W_dec, codes.offsets, w)

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad [N, d_in]
        w, W_dec = ctx.saved_tensors
        codes: SparseCodes = ctx.codes
        grad = grad.contiguous()
        grad_w = _sampled_dot(codes, grad, W_dec) if ctx.needs_input_grad[0] else None
        grad_W_dec = _by_feature_sum(codes, grad, w) if ctx.needs_input_grad[1] else None
        return grad_w, grad_W_dec, None


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
    return _PreActsAt.apply(pre, x_c, W_enc, b_enc, b_dec, codes)


def decode_sparse(weights: Tensor, W_dec: Tensor, codes: SparseCodes) -> Tensor:
    """`S @ W_dec` for the sparse `[N, d_sae]` matrix `S` holding `weights [nnz]` on the pattern: `[N, d_in]`."""
    return _SparseDecode.apply(weights, W_dec, codes)
