"""TransformerLens's `utils` helpers that researchers call by habit, for encoder-decoder T5s.

`get_act_name` is TransformerLens's (and its shorthands: "k6" -> layer 6, "scale4ln1", TL layer types
"attn"/"a", "mlp"/"m", "ln_final"); `get_act_name("embed")` is "hook_embed" as there, and in the layers the
decoder is the default stack, the one whose output is the logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .analysis.cache import get_act_name as get_act_name  # TransformerLens's name, re-exported


def to_numpy(tensor: Any) -> np.ndarray:
    """A tensor (detached, on the CPU), list, scalar or array as a numpy array."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, (list, tuple)):
        return np.array(tensor)
    if isinstance(tensor, Tensor):
        return tensor.detach().cpu().numpy()
    if isinstance(tensor, (int, float, bool, str)):
        return np.array(tensor)
    raise ValueError(f"cannot convert {type(tensor).__name__} to numpy")


def lm_cross_entropy_loss(logits: Tensor, labels: Tensor, per_token: bool = False) -> Tensor:
    """Cross-entropy of decoder logits `[B, D, V]` against the labels `[B, D]` (the decoder input shifted left:
    position i predicts label i; -100 ignored). TransformerLens's decoder-only version shifts by one instead."""
    loss = F.cross_entropy(logits.float().transpose(1, 2), labels.long(), ignore_index=-100, reduction="none")
    if per_token:
        return loss
    return loss.sum() / (labels != -100).sum().clamp(min=1)


def lm_accuracy(logits: Tensor, labels: Tensor, per_token: bool = False) -> Tensor:
    """Fraction of positions whose argmax is the label (positions with label -100 skipped)."""
    correct = logits.argmax(-1) == labels
    if per_token:
        return correct
    keep = labels != -100
    return correct[keep].float().mean()


@torch.no_grad()
def test_prompt(
    prompt: str,
    answer: str,
    model: Any,
    prepend_space_to_answer: bool = False,
    print_details: bool = True,
    top_k: int = 10,
) -> list[dict[str, Any]]:
    """TransformerLens's `test_prompt` for an encoder-decoder: the encoder reads `prompt`, the decoder is
    teacher-forced on `answer`; for each answer token, its rank and probability and the top-k predictions.
    Returns one dict per answer token (`token`, `rank`, `prob`, `top`), printing them with `print_details`."""
    if prepend_space_to_answer and not answer.startswith(" "):
        answer = " " + answer
    answer_ids = model.to_decoder_tokens(answer)[0, 1:]  # without the start token
    logits = model(prompt, answer)[0, :-1]  # position i predicts answer token i
    probs = logits.float().softmax(-1)
    rows = []
    if print_details:
        print(f"Prompt: {model.to_str_tokens(prompt)}")
        print(f"Answer: {model.to_str_tokens(answer_ids)}")
    for i, token in enumerate(answer_ids.tolist()):
        rank = int((logits[i] > logits[i, token]).sum())
        top = probs[i].topk(min(top_k, probs.shape[-1]))
        row = {
            "token": model.to_single_str_token(token),
            "rank": rank,
            "prob": float(probs[i, token]),
            "top": [(model.to_single_str_token(int(t)), float(p)) for p, t in zip(top.values, top.indices)],
        }
        rows.append(row)
        if print_details:
            shown = ", ".join(f"{s!r} {p:.3f}" for s, p in row["top"][:top_k])
            print(f"Answer token {row['token']!r}: rank {rank}, prob {row['prob']:.3f} | top: {shown}")
    return rows


test_prompt.__test__ = False  # a TransformerLens name, not a pytest test
