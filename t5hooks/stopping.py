"""The stop ids of generation: `eos_token_id` as one id or a list of ids (TransformerLens's documented forms),
checked against the vocabulary. Shared by `generate` and the ONNX Runtime generator."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def stop_tokens(eos_token_id: int | Sequence[int], d_vocab: int, device: torch.device) -> Tensor:
    """The stop ids as a 1-D LongTensor: one id, or a list / tuple / tensor of ids (checked)."""
    ids = eos_token_id.tolist() if isinstance(eos_token_id, Tensor) else eos_token_id
    ids = [ids] if _is_int(ids) else ids
    if not isinstance(ids, (list, tuple)) or not ids or not all(_is_int(i) for i in ids):
        raise TypeError(f"eos_token_id must be a token id or a non-empty list of token ids, got {eos_token_id!r}")
    bad = [int(i) for i in ids if not 0 <= int(i) < d_vocab]
    if bad:
        raise ValueError(f"eos_token_id has ids {bad} outside the vocabulary 0..{d_vocab - 1}")
    return torch.tensor([int(i) for i in ids], dtype=torch.long, device=device)
