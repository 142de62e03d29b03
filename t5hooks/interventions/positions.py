"""Which sequence positions an intervention acts on, as a broadcastable 0/1 mask (no data-dependent indexing)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def position_mask(x: Tensor, positions: Sequence[int]) -> Tensor:
    """`[1, pos, 1, ..., 1]` mask (x's dtype), 1 at `positions` along axis 1 (negative ones count from the end)."""
    pos = x.shape[1]
    index = torch.arange(pos, device=x.device)  # [pos]
    mask = torch.zeros(pos, dtype=torch.bool, device=x.device)
    for p in positions:
        mask = mask | (index == (p % pos if p < 0 else p))
    return mask.to(x.dtype).reshape(1, pos, *([1] * (x.ndim - 2)))
