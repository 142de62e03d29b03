"""Key/value caches for incremental decoding: one `KVCache` per attention layer, a `DecoderCache` per decoder stack."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values `[B,H,T,d_head]` of one attention layer during incremental decoding."""

    def __init__(self, k: Tensor | None = None, v: Tensor | None = None) -> None:
        self.k, self.v = k, v

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: Tensor, v: Tensor, append: bool) -> tuple[Tensor, Tensor]:
        if append and self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search)."""
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class DecoderCache:
    """Per-layer self-attention and cross-attention K/V during incremental decoding (see generation.py)."""

    def __init__(self, n_layers: int) -> None:
        self.self_attn = [KVCache() for _ in range(n_layers)]
        self.cross_attn = [KVCache() for _ in range(n_layers)]

    @property
    def length(self) -> int:
        """Decoder positions already processed (the query offset of the next step)."""
        return self.self_attn[0].length

    def reorder(self, index: Tensor) -> None:
        for cache in self.self_attn + self.cross_attn:
            cache.reorder(index)
