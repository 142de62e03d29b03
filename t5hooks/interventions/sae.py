"""Sparse autoencoders that splice into a hook point: ReLU (standard), TopK, BatchTopK, JumpReLU.

Weights use SAELens's layout, so its checkpoints load as they are (saelens_format.py):
`W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`, `threshold [d_sae]` (JumpReLU).

    features = act(pre),  pre = (x - b_dec) @ W_enc + b_enc     (b_dec subtracted iff apply_b_dec_to_input)
    x_hat    = features @ W_dec + b_dec

As an intervention (`model.capture(..., intervene={hook: sae})`) `sae(x)` returns
`(x_hat [+ error], {"features": features})`. With `use_error_term` the reconstruction error
`x - x_hat` is added back (computed without gradient, as SAELens does), so the network sees exactly `x` while
features stay inspectable and editable (`feature_edit`); without it the network sees the reconstruction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")


class SAE(nn.Module):
    """ReLU sparse autoencoder ("standard" in SAELens): `features = relu(pre)`.

    `use_error_term`: splice `x_hat + (x - x_hat)` (the model's output unchanged) instead of `x_hat`.
    `feature_edit`: optional `fn(features) -> features` applied before decoding when spliced (ablation,
    clamping); with the error term, the error stays that of the unedited features, as in SAELens.
    `rescale_acts_by_decoder_norm` (SAELens's TopK training parametrisation): pre-activations are multiplied by
    the decoder row norms and features decoded through unit-norm rows, so the decoder's scale never changes which
    features win; `fold_decoder_norm()` turns it into the plain form (the trainers do so when training ends).
    """

    architecture = "standard"

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        apply_b_dec_to_input: bool = True,
        use_error_term: bool = False,
        rescale_acts_by_decoder_norm: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if d_in < 1 or d_sae < 1:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={d_in}, d_sae={d_sae}")
        self.d_in, self.d_sae = d_in, d_sae
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.use_error_term = use_error_term
        self.rescale_acts_by_decoder_norm = rescale_acts_by_decoder_norm
        self.feature_edit: Callable[[Tensor], Tensor] | None = None
        kw = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **kw))  # [d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))  # [d_sae]
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, **kw))  # [d_sae, d_in]
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))  # [d_in]
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int | None = None, decoder_norm: float = 1.0) -> None:
        """Random decoder rows of norm `decoder_norm` (SAELens's training init uses 0.1: the first
        reconstructions are small instead of several times the input), encoder = the decoder's transpose,
        zero biases."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            w = torch.randn(self.d_sae, self.d_in, generator=g, dtype=torch.float32)
            w = w * (decoder_norm / w.norm(dim=1, keepdim=True))
            self.W_dec.copy_(w)
            self.W_enc.copy_(w.T)
            self.b_enc.zero_()
            self.b_dec.zero_()

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_sae={self.d_sae}, use_error_term={self.use_error_term}"

    # ---- the maths ----------------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:  # [..., d_in] -> [..., d_sae]
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        return pre * self.W_dec.norm(dim=1) if self.rescale_acts_by_decoder_norm else pre

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def encode(self, x: Tensor) -> Tensor:  # [..., d_in] -> [..., d_sae]
        return self.activation(self.pre_acts(x.to(self.W_enc.dtype)))

    def decode(self, features: Tensor) -> Tensor:  # [..., d_sae] -> [..., d_in]
        if self.rescale_acts_by_decoder_norm:
            features = features / self.W_dec.norm(dim=1)
        return features @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """`(x_hat [+ error], {"features": [..., d_sae]})`, in `x`'s dtype."""
        features = self.encode(x)
        edited = features if self.feature_edit is None else self.feature_edit(features)
        x_hat = self.decode(edited)
        if self.use_error_term:
            with torch.no_grad():
                error = x.to(x_hat.dtype) - (x_hat if edited is features else self.decode(features))
            x_hat = x_hat + error
        return x_hat.to(x.dtype), {"features": edited}

    @torch.no_grad()
    def fold_decoder_norm(self) -> None:
        """Unit-norm decoder rows with the norms folded into the encoder (and threshold): the same function.
        Folds SAELens's `rescale_acts_by_decoder_norm` parametrisation (then turns it off); for a plain ReLU or
        JumpReLU SAE it rescales the features (as SAELens's `fold_W_dec_norm`). A plain TopK SAE cannot be
        folded: its top k would change."""
        if not self.rescale_acts_by_decoder_norm and isinstance(self, TopKSAE):
            raise ValueError("folding the decoder norms of a TopK SAE trained without rescaling changes its top k")
        norms = self.W_dec.norm(dim=1).clamp_min(torch.finfo(self.W_dec.dtype).tiny)  # [d_sae]
        if not self.rescale_acts_by_decoder_norm and isinstance(self, JumpReLUSAE):
            self.threshold.mul_(norms)  # features scale by the norms, so does the jump
        self.W_enc.mul_(norms[None, :])
        self.b_enc.mul_(norms)
        self.W_dec.div_(norms[:, None])
        self.rescale_acts_by_decoder_norm = False


class TopKSAE(SAE):
    """Keeps the `k` largest pre-activations per token (then ReLU), zeroing the rest."""

    architecture = "topk"

    def __init__(self, d_in: int, d_sae: int, k: int, **kwargs) -> None:
        if not 1 <= k <= d_sae:
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
        super().__init__(d_in, d_sae, **kwargs)
        self.k = k

    def activation(self, pre: Tensor) -> Tensor:
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.k}"


class JumpReLUSAE(SAE):
    """`features = pre * (pre > threshold)` with a learned per-feature threshold `[d_sae]`."""

    architecture = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, **kwargs) -> None:
        super().__init__(d_in, d_sae, **kwargs)
        self.threshold = nn.Parameter(torch.zeros(d_sae, dtype=self.W_enc.dtype, device=self.W_enc.device))

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre) * (pre > self.threshold)


class BatchTopKSAE(JumpReLUSAE):
    """BatchTopK (Bussmann et al. 2024): in training keeps the `k * n_tokens` largest activations over the
    whole batch; for inference it is a JumpReLU with one global `threshold` estimated during training
    (a running mean of the smallest kept activation, SAELens's `topk_threshold`), which is how SAELens saves it."""

    architecture = "batchtopk"

    def __init__(self, d_in: int, d_sae: int, k: int, **kwargs) -> None:
        if not 1 <= k <= d_sae:
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
        super().__init__(d_in, d_sae, **kwargs)
        self.threshold.requires_grad_(False)
        self.k = k

    def activation(self, pre: Tensor) -> Tensor:
        """Training: the `k * n_tokens` largest activations of the batch (the trainer's kernels do the same
        across ranks and update `threshold`); inference: JumpReLU at `threshold`."""
        if not self.training:
            return super().activation(pre)
        acts = torch.relu(pre)
        flat = acts.reshape(-1)  # [n_tokens * d_sae]
        values, indices = flat.topk(min(self.k * (flat.numel() // self.d_sae), flat.numel()))
        return torch.zeros_like(flat).scatter(0, indices, values).reshape(acts.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.k}"


def build_sae(architecture: str, d_in: int, d_sae: int, k: int | None = None, **kwargs) -> SAE:
    """An SAE by SAELens architecture name: "standard", "topk", "batchtopk" (both need `k`), "jumprelu"."""
    if architecture == "standard":
        return SAE(d_in, d_sae, **kwargs)
    if architecture == "jumprelu":
        return JumpReLUSAE(d_in, d_sae, **kwargs)
    if architecture in ("topk", "batchtopk"):
        if k is None:
            raise ValueError(f"architecture {architecture!r} needs k (active features per token)")
        cls = TopKSAE if architecture == "topk" else BatchTopKSAE
        return cls(d_in, d_sae, k, **kwargs)
    raise ValueError(f"unknown SAE architecture {architecture!r}; valid: {', '.join(ARCHITECTURES)}")
