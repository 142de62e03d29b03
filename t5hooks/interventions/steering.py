"""A learned steering vector: adds `coefficient * vector` to the activation (optionally only at some positions)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .positions import position_mask


class SteeringVector(nn.Module):
    """`x + coefficient * vector` with `vector [d]` a parameter (zero-initialised: splicing starts as identity).

    `positions`: sequence positions (axis 1) to steer; None steers all. `coefficient` scales the vector at
    inference (sweeps) without retraining.
    """

    def __init__(
        self,
        d: int,
        *,
        positions: Sequence[int] | None = None,
        coefficient: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.vector = nn.Parameter(torch.zeros(d, dtype=dtype, device=device))  # [d]
        self.positions = None if positions is None else tuple(int(p) for p in positions)
        self.coefficient = float(coefficient)

    def forward(self, x: Tensor) -> Tensor:  # [B, pos, ..., d]
        delta = self.coefficient * self.vector.to(x.dtype)
        if self.positions is None:
            return x + delta
        return x + delta * position_mask(x, self.positions)
