"""Synthetic activations with planted sparse features: ground truth for checking that SAE training recovers them."""

from __future__ import annotations

import torch
from torch import Tensor


def planted_features(n_features: int, d: int, n_tokens: int, active: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Synthetic data with known sparse structure: `x = sum of `active` unit directions (random non-negative
    magnitudes)`. Returns (directions [n_features, d], activations [n_tokens, d])."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d, generator=g)
    directions = directions / directions.norm(dim=1, keepdim=True)
    idx = torch.rand(n_tokens, n_features, generator=g).topk(active, dim=1).indices  # [N, active]
    mags = torch.rand(n_tokens, active, generator=g) + 0.5
    codes = torch.zeros(n_tokens, n_features).scatter(1, idx, mags)
    return directions, codes @ directions


def max_cosine(learned: Tensor, planted: Tensor) -> Tensor:
    """For each planted direction `[n, d]`, its best cosine with a learned decoder row `[d_sae, d]`."""
    a = planted / planted.norm(dim=1, keepdim=True)
    b = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return (a @ b.T).max(dim=1).values
