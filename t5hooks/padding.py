"""Token batches given without an attention mask: every token is attended, and right padding is warned about.

TransformerLens's reference says of `one_zero_attention_mask`: "If not provided, the model assumes all tokens
should be attended to"; TransformerLens 3.9 and Hugging Face both do exactly that, and so does t5hooks on every
path (eager, capture, compiled, ONNX Runtime, generate). No mask is ever inferred from the pad id: a pad id inside
a sequence (a generated 0 in a decoder input) is a token like any other. A batch that looks like a tokenizer's
right-padded output (a row ending in EOS followed only by pad ids) but comes without its mask is almost always a
mistake, so it warns, through `warnings.warn`, on every such call (Python's warning filters decide repetition).
"""

from __future__ import annotations

from typing import Any

import torch

from .user_warning import warn_user


def looks_right_padded(tokens: Any, eos_token_id: int | None, pad_token_id: int | None) -> bool:
    """True when some row of `tokens` (`[batch, pos]` or `[pos]`; a tensor or numpy array) ends in EOS followed
    by at least one pad id and nothing else: what a tokenizer's padded batch looks like."""
    if eos_token_id is None or pad_token_id is None or eos_token_id == pad_token_id:
        return False
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        return False
    trailing = (tokens == pad_token_id).flip(1).long().cumprod(1).sum(1)  # [B] pads at the end of each row
    last_real = (tokens.shape[1] - 1 - trailing).clamp(min=0)  # [B] the position before them
    ends_in_eos = tokens.gather(1, last_real[:, None])[:, 0] == eos_token_id
    return bool(((trailing > 0) & (trailing < tokens.shape[1]) & ends_in_eos).any())


def warn_if_right_padded(tokens: Any, eos_token_id: int | None, pad_token_id: int | None, what: str = "input") -> None:
    """Warn (at the caller's line) when a batch given without a mask `looks_right_padded`."""
    if looks_right_padded(tokens, eos_token_id, pad_token_id):
        warn_user(
            f"{what} looks right-padded (a row ends in EOS={eos_token_id} followed by pad_token_id={pad_token_id}) "
            f"but no attention mask was given: every token is attended, the pads included (as TransformerLens and "
            f"Hugging Face do). Pass one_zero_attention_mask=..., or the (tokens, attention_mask) pair that "
            f"model.to_tokens returns: model(model.to_tokens(texts), ...)"
        )
