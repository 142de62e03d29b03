"""The training objective of each SAE architecture, with SAELens's definitions (so its hyperparameters transfer),
computed with the sparse kernels of `sae_kernels.py` and correct across ranks.

Per SAE, on this rank's tokens `x [N, d_in]` of a global batch of `n_global` tokens (sums over tokens are divided
by `n_global`, so the ranks' gradients add up to the global mean's):

* mse  = `sum_t |x_hat_t - x_t|^2 / n_global`  (SAELens: squared error summed over d_in, mean over tokens)
* standard: `+ l1 * sum_t sum_j f_tj * |W_dec[j]| / n_global`, `f = relu(pre)`
* topk: `f = relu(topk_k(h))` with `h = pre * |W_dec|` when `rescale_acts_by_decoder_norm` (decoded through
  unit-norm rows); `+ aux * min(n_dead / k_aux, 1) * sum_t |e_t - r_t|^2 / n_global`, where `e_t` decodes (no
  bias) the `min(k_aux, n_dead)` largest dead `h` of token t and `r = (x - x_hat)` detached (SAELens's TopK
  auxiliary loss: no variance normalisation, k_aux = d_in // 2 by default)
* batchtopk: as topk, but `f` keeps the `k * n_global` largest `relu(h)` of the GLOBAL batch (a threshold
  found from every rank's candidates); the smallest kept value feeds the inference threshold.

`training_step` runs eagerly (data-dependent shapes: the active pairs of each batch); `compiled_training_step` is
the same objective with static shapes for `torch.compile(fullgraph=True)` (the same sparse kernels for TopK and
BatchTopK, `dense_training_step` for the ReLU SAE); fired counts and L0 count positive activations, as SAELens's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import distributed
from .sae import SAE
from .sae_kernels import SparseCodes, decode_sparse, encode_at, encode_dense, raw_pre_acts


@dataclass
class Objective:
    """Hyper-parameters of the loss (one SAE); see the module docstring."""

    architecture: str
    k: int = 0
    l1_coefficient: float = 0.0  # this step's value (after any warm-up)
    aux_coefficient: float = 1.0
    aux_k: int | None = None
    sparse_below: float = 0.2  # standard: sparse kernels when the last step's feature density was below this


@dataclass
class StepResult:
    loss: Tensor  # scalar: this rank's share of the global mean loss (backward on the sum over SAEs)
    x_hat: Tensor  # [N, d_in], detached
    fired: Tensor  # [d_sae] int64: active pairs per feature on this rank
    active: int  # active (token, feature) pairs on this rank
    batch_threshold: Tensor | None = None  # batchtopk: smallest kept activation of the global batch (inf if none)


def training_step(
    sae: SAE, x: Tensor, obj: Objective, dead: Tensor, n_global: int, *, density: float = 1.0
) -> StepResult:
    """The loss of one SAE on this rank's `x [N, d_in]` (float, on the SAE's device). `dead [d_sae]` bool: the
    globally dead features; `density`: the last step's active fraction (chooses dense or sparse kernels for
    the standard SAE; TopK and BatchTopK are always sparse)."""
    b_dec = sae.b_dec if sae.apply_b_dec_to_input else None
    if obj.architecture == "standard" and density > obj.sparse_below:
        return _standard_dense(sae, x, obj, n_global, b_dec)
    pre, x_c = raw_pre_acts(x, sae.W_enc, sae.b_enc, b_dec)  # [N, d_sae], no autograd: the one dense GEMM
    norms = sae.W_dec.norm(dim=1)  # [d_sae], with autograd
    scored = pre * norms.detach() if sae.rescale_acts_by_decoder_norm else pre  # SAELens's hidden_pre (no autograd)
    threshold = None
    if obj.architecture == "topk":
        codes = SparseCodes.from_topk(scored.topk(obj.k, dim=-1, sorted=False).indices, sae.d_sae)
    elif obj.architecture == "batchtopk":
        threshold = global_kth_largest(scored.relu(), obj.k * n_global)
        codes = SparseCodes.from_mask((scored >= threshold) & (scored > 0))
    elif obj.architecture == "standard":
        codes = SparseCodes.from_mask(pre > 0)
    else:
        raise ValueError(f"cannot train architecture {obj.architecture!r}")
    acts, x_hat = _reconstruct(sae, pre, x_c, norms, b_dec, codes)
    loss = (x_hat - x).square().sum() / n_global
    if obj.architecture == "standard":
        loss = loss + obj.l1_coefficient * (acts * norms[codes.cols]).sum() / n_global
    else:
        n_dead = int(dead.sum())
        if n_dead and obj.aux_coefficient:
            k_aux = obj.aux_k or sae.d_in // 2
            aux = _aux_loss(sae, x, x_hat, pre, x_c, scored, b_dec, dead, min(k_aux, n_dead), k_aux, n_global)
            loss = loss + obj.aux_coefficient * aux
    batch_threshold = None
    if threshold is not None:
        kept = acts.detach()
        smallest = kept[kept > 0].min() if bool((kept > 0).any()) else kept.new_tensor(float("inf"))
        batch_threshold = distributed.all_reduce_min(smallest.reshape(1))[0]
    fired = codes.fired(acts)
    return StepResult(loss, x_hat.detach(), fired, int(fired.sum()), batch_threshold)


def compiled_training_step(
    sae: SAE, x: Tensor, dead: Tensor, scalars: Tensor, *, architecture: str, k: int, aux_k: int, any_dead: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The objective with static shapes, for `torch.compile(fullgraph=True)`: `scalars = [l1_coefficient,
    aux_coefficient, n_global]` are tensors, so a changing L1 warm-up or dead mask does not recompile; the graph
    specialises only on `any_dead` (whether the auxiliary loss runs: two graphs at most). TopK and BatchTopK run
    the sparse kernels of `training_step` (BatchTopK keeps exactly `k * N` pairs, ties at the threshold cut in
    row-major order); the ReLU SAE the dense formulation (its active set has no static size). One process only
    for batchtopk (its top k is this batch's). Returns `(loss, x_hat (detached), fired [d_sae], batch threshold
    or None)`."""
    if architecture == "standard":
        return dense_training_step(sae, x, dead, scalars, architecture=architecture, k=k, aux_k=aux_k)
    aux_coefficient, n_global = scalars[1], scalars[2]
    b_dec = sae.b_dec if sae.apply_b_dec_to_input else None
    pre, x_c = raw_pre_acts(x, sae.W_enc, sae.b_enc, b_dec)
    norms = sae.W_dec.norm(dim=1)
    scored = pre * norms.detach() if sae.rescale_acts_by_decoder_norm else pre
    real = None
    if architecture == "topk":
        codes = SparseCodes.from_topk(scored.topk(k, dim=-1, sorted=False).indices, sae.d_sae)
    else:
        size = k * x.shape[0]
        mask = (scored >= kth_largest_in_rows(scored.relu(), size)) & (scored > 0)
        codes = SparseCodes.from_mask(mask, size=size)
        real = torch.arange(size, device=x.device) < mask.sum()  # False: a padding pair after the active ones
    acts, x_hat = _reconstruct(sae, pre, x_c, norms, b_dec, codes, real)
    loss = (x_hat - x).square().sum() / n_global
    if any_dead:
        loss = loss + aux_coefficient * _aux_loss(sae, x, x_hat, pre, x_c, scored, b_dec, dead, aux_k, aux_k, n_global)
    threshold = torch.where(acts > 0, acts, torch.inf).min().detach() if architecture == "batchtopk" else None
    return loss, x_hat.detach(), codes.fired(acts), threshold


def _reconstruct(sae, pre, x_c, norms, b_dec, codes: SparseCodes, real: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`(acts [nnz], x_hat [N, d_in])`: the activations at the pairs (with autograd; zero where `real` is False)
    and the reconstruction, through unit-norm decoder rows when rescaling (SAELens's TopK parametrisation)."""
    hidden = encode_at(pre, x_c, sae.W_enc, sae.b_enc, b_dec, codes)  # [nnz]
    cols = codes.cols
    if sae.rescale_acts_by_decoder_norm:
        hidden = hidden * norms[cols]
    if real is not None:
        hidden = torch.where(real, hidden, 0.0)
    acts = torch.relu(hidden)
    weights = acts / norms[cols] if sae.rescale_acts_by_decoder_norm else acts
    return acts, decode_sparse(weights, sae.W_dec, codes) + sae.b_dec


def _aux_loss(sae, x, x_hat, pre, x_c, scored, b_dec, dead, n_aux: int, k_aux: int, n_global) -> Tensor:
    """SAELens's TopK auxiliary loss (see the module docstring), before its coefficient: the `n_aux` largest
    dead `scored` of each token (`n_aux >= min(k_aux, n_dead)`; live ones among them are zeroed) decoded from
    their raw pre-activations (SAELens divides its rescaled hidden_pre by the decoder norms again), against the
    detached residual."""
    masked = torch.where(dead, scored, torch.finfo(scored.dtype).min)
    codes = SparseCodes.from_topk(masked.topk(n_aux, dim=-1, sorted=False).indices, sae.d_sae)
    hidden = torch.where(dead[codes.cols], encode_at(pre, x_c, sae.W_enc, sae.b_enc, b_dec, codes), 0.0)
    recons = decode_sparse(hidden, sae.W_dec, codes)
    scale = (dead.sum() / k_aux).clamp(max=1.0)
    residual = (x - x_hat).detach()
    return scale * (recons - residual).square().sum() / n_global


def _standard_dense(sae: SAE, x: Tensor, obj: Objective, n_global: int, b_dec: Tensor | None) -> StepResult:
    """The ReLU SAE while its features are dense: five GEMMs (SAELens's formulation runs six)."""
    pre = encode_dense(x, sae.W_enc, sae.b_enc, b_dec)  # [N, d_sae]
    f = torch.relu(pre)
    norms = sae.W_dec.norm(dim=1)
    x_hat = torch.addmm(sae.b_dec, f, sae.W_dec)
    loss = (x_hat - x).square().sum() / n_global + obj.l1_coefficient * (f.sum(0) @ norms) / n_global
    with torch.no_grad():
        fired = (f > 0).sum(0)
    return StepResult(loss, x_hat.detach(), fired, int(fired.sum()))


@torch.no_grad()
def global_kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest entry of `values [N, m]` over every rank (k counts the global batch), identical on every
    rank (-inf when there are fewer than k): each rank offers its entries at or above its own k-th largest (the
    global top k is among them), every rank selects from all offers. A scalar tensor."""
    flat = values.reshape(-1)
    local = kth_largest_in_rows(values, min(k, flat.numel()))
    if not distributed.active():
        return local if flat.numel() >= k else local.new_tensor(-torch.inf)
    offers = distributed.gather_rows(flat[flat >= local])
    return _kth_largest(offers, k) if offers.numel() >= k else local.new_tensor(-torch.inf)


def kth_largest_in_rows(values: Tensor, k: int) -> Tensor:
    """The k-th largest entry of `values [N, m]` (a scalar tensor), selected from a candidate set: each row's
    `c = 4 * ceil(k / N)` largest entries. Exact: if no row has its c-th largest above the candidates' k-th
    largest `t`, every entry left out is at most `t`, so `t` is the k-th largest of all; otherwise (a row holding
    more than c of the top k) the selection runs over every entry (compiled: a `torch.cond`)."""
    n, m = values.shape
    c = 4 * -(-k // n)
    if 2 * c >= m:  # a candidate set of half the entries or more saves nothing
        return _kth_largest(values.reshape(-1), k)
    candidates = values.topk(c, dim=1, sorted=False).values  # [N, c]
    t = _kth_largest(candidates.reshape(-1), k)
    exact = (candidates.min(1).values <= t).all()
    if not torch.compiler.is_compiling():  # (eager torch.cond would itself run through Dynamo)
        return t if bool(exact) else _kth_largest(values.reshape(-1), k)
    return torch.cond(exact, lambda v, t: t.clone(), lambda v, t: _kth_largest(v.reshape(-1), k), (values, t))


def _kth_largest(flat: Tensor, k: int) -> Tensor:
    """Selection, not sorting: `kthvalue` is several times faster than `topk(k)` for k in the tens of thousands."""
    return flat.kthvalue(flat.numel() - k + 1).values


def dense_training_step(
    sae: SAE, x: Tensor, dead: Tensor, scalars: Tensor, *, architecture: str, k: int, aux_k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The same objective in SAELens's dense formulation with static shapes (the ReLU SAE's compiled step, and
    the autograd reference the kernels are tested against): `scalars = [l1_coefficient, aux_coefficient,
    n_global]` are tensors (a changing L1 warm-up or dead mask does not recompile). One process only for batchtopk (its top k is this batch's). Returns
    `(loss, x_hat (detached), fired [d_sae], batch threshold or None)`."""
    l1, aux_coefficient, n_global = scalars[0], scalars[1], scalars[2]
    pre = sae.pre_acts(x)  # [N, d_sae] (times the decoder norms when rescaling)
    norms = sae.W_dec.norm(dim=1)
    if architecture == "standard":
        f = torch.relu(pre)
    elif architecture == "topk":
        values, indices = pre.topk(k, dim=-1, sorted=False)
        f = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
    else:
        flat = torch.relu(pre).reshape(-1)
        values, indices = flat.topk(k * x.shape[0], sorted=False)
        f = torch.zeros_like(flat).scatter(0, indices, values).reshape(pre.shape)
    x_hat = sae.decode(f)
    loss = (x_hat - x).square().sum() / n_global
    threshold = None
    if architecture == "standard":
        loss = loss + l1 * (f.sum(0) @ norms) / n_global
    else:
        masked = torch.where(dead, pre, torch.finfo(pre.dtype).min)
        values, indices = masked.topk(aux_k, dim=-1, sorted=False)
        values = torch.where(dead[indices], values, 0.0)  # fewer than aux_k dead: only the dead count
        aux = torch.zeros_like(pre).scatter(-1, indices, values)
        if sae.rescale_acts_by_decoder_norm:
            aux = aux / norms
        recons = aux @ sae.W_dec
        scale = (dead.sum() / aux_k).clamp(max=1.0)
        residual = (x - x_hat).detach()
        loss = loss + aux_coefficient * scale * (recons - residual).square().sum() / n_global
        if architecture == "batchtopk":
            threshold = torch.where(f > 0, f, torch.inf).min().detach()
    return loss, x_hat.detach(), (f > 0).sum(0), threshold
