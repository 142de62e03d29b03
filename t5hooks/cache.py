"""ActivationCache: the activations of one run, by hook name, aware of the encoder and decoder stacks."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor


class ActivationCache(Mapping):
    """A read-only mapping `hook name -> tensor` from `run_with_cache`, with TransformerLens's conveniences."""

    def __init__(self, cache_dict: dict[str, Tensor], model: Any, has_batch_dim: bool = True) -> None:
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    # ---- mapping -----------------------------------------------------------------------
    def __getitem__(self, key: str) -> Tensor:
        if key in self.cache_dict:
            return self.cache_dict[key]
        from .hook_points import unknown_name_message

        raise KeyError(unknown_name_message(key, list(self.cache_dict)) + " (in this cache)")

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __contains__(self, key: object) -> bool:
        return key in self.cache_dict

    def __repr__(self) -> str:
        return f"ActivationCache with {len(self)} activations: {list(self.cache_dict)[:6]}{' ...' if len(self) > 6 else ''}"

    # ---- moving ------------------------------------------------------------------------
    def to(self, device: str | torch.device, move_model: bool = False) -> "ActivationCache":
        """Move every activation (and optionally the model) to `device`; returns self."""
        self.cache_dict = {name: t.to(device) for name, t in self.cache_dict.items()}
        if move_model:
            self.model.to(device)
        return self

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch dimension of a batch-of-one cache in place; returns self."""
        if not self.has_batch_dim:
            return self
        sizes = {t.shape[0] for t in self.cache_dict.values()}
        if sizes - {1}:
            raise ValueError(f"remove_batch_dim needs a batch of 1; this cache has batch sizes {sorted(sizes)}")
        self.cache_dict = {name: t[0] for name, t in self.cache_dict.items()}
        self.has_batch_dim = False
        return self
