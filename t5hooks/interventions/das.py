"""Distributed alignment search: interchange a learned low-rank subspace between a base and a source run.

With `R [d, k]` orthonormal columns (kept orthonormal by `torch.nn.utils.parametrizations.orthogonal`)

    base' = base + ((source - base) @ R) @ R.T

i.e. base's coordinates in the subspace are replaced by source's and the orthogonal complement is kept (the
`LowRankRotatedSpaceIntervention` of pyvene). Two ways to feed the source run: stacked in ONE forward (inputs
stacked on the batch axis with `interchange_batch`; at the hook the module splits the activation `[2B, ...]`,
intervenes on the first half and passes the second through), or, as `train_das` does, with the source
activation computed beforehand and set as `module.source` (then the forward carries the base run alone: the
source run stops at the hook and never enters the backward pass).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from ..hook_io import is_tracing
from .positions import position_mask


class _Rotation(nn.Module):
    def __init__(self, d: int, k: int, dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d, k, dtype=dtype, device=device))  # [d, k]
        nn.init.orthogonal_(self.weight)


class RotatedSubspaceInterchange(nn.Module):
    """Low-rank rotated-subspace interchange (DAS) over a base/source batch stacked on axis 0.

    `positions`: sequence positions (axis 1) to intervene at; None = all. Side output `"subspace"`: the base
    half's coordinates in the subspace after the interchange, `[B, ..., k]`.
    """

    def __init__(
        self,
        d: int,
        k: int,
        *,
        positions: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= k <= d:
            raise ValueError(f"subspace rank k must be in [1, d={d}], got {k}")
        self.d, self.k = d, k
        self.rotation = orthogonal(_Rotation(d, k, dtype, device))
        self.positions = None if positions is None else tuple(int(p) for p in positions)
        self.source: Tensor | None = None  # [B, ..., d]: the source activation, when not stacked in the batch

    @property
    def R(self) -> Tensor:  # [d, k], orthonormal columns
        return self.rotation.weight

    def interchange(self, base: Tensor, source: Tensor) -> Tensor:
        """`base + ((source - base) @ R) @ R.T` at the chosen positions."""
        R = self.R.to(base.dtype)
        delta = ((source - base) @ R) @ R.T
        if self.positions is not None:
            delta = delta * position_mask(base, self.positions)
        return base + delta

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:  # [2B, ..., d] stacked, [B, ..., d] with .source
        if self.source is not None:
            if not is_tracing() and self.source.shape != x.shape:
                raise ValueError(f"source activation {tuple(self.source.shape)} and base {tuple(x.shape)} differ")
            new_base = self.interchange(x, self.source)
            return new_base, {"subspace": new_base @ self.R.to(x.dtype)}
        base, source = split_interchange(x)
        new_base = self.interchange(base, source)
        return torch.cat([new_base, source], dim=0), {"subspace": new_base @ self.R.to(x.dtype)}

    def extra_repr(self) -> str:
        return f"d={self.d}, k={self.k}, positions={self.positions}"


def split_interchange(x: Tensor) -> tuple[Tensor, Tensor]:
    """(base, source) halves of an interchange batch (axis 0)."""
    if not is_tracing() and x.shape[0] % 2:
        raise ValueError(f"an interchange batch stacks base and source runs: even batch needed, got {x.shape[0]}")
    half = x.shape[0] // 2
    return x[:half], x[half:]


def interchange_batch(base: Tensor, source: Tensor) -> Tensor:
    """Stack base and source inputs (same shape, e.g. tokens `[B, pos]`) into one `[2B, ...]` batch."""
    if base.shape != source.shape:
        raise ValueError(f"base {tuple(base.shape)} and source {tuple(source.shape)} inputs must have one shape")
    return torch.cat([base, source], dim=0)
