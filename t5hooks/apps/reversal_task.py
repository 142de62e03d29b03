"""The string-reversal task of the embedded `t5hooks-tiny` model: random lowercase words, padded batches, a fixed
held-out set, exact-match accuracy and the mirror-attention score. Shared by `t5hooks train-tiny`, the demos and
the benchmarks."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

import torch
from torch import Tensor

from ..tokenizer import ByteTokenizer

ALPHABET = string.ascii_lowercase
MIN_LEN, MAX_LEN = 2, 10
PAD_TO = MAX_LEN + 1  # bytes + EOS
HELD_OUT_SEED = 1234
HELD_OUT_SIZE = 1000


def random_word(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def held_out_words(n: int = HELD_OUT_SIZE) -> list[str]:
    """A fixed evaluation set, never trained on."""
    rng = random.Random(HELD_OUT_SEED)
    return [random_word(rng) for _ in range(n)]


@dataclass
class Batch:
    tokens: Tensor  # [B, PAD_TO] input bytes + EOS, right-padded
    mask: Tensor  # [B, PAD_TO]
    labels: Tensor  # [B, PAD_TO] reversed bytes + EOS, -100 where padded


def make_batch(words: list[str], tokenizer: ByteTokenizer) -> Batch:
    def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
        rows = [tokenizer.encode(t) for t in texts]
        ids = torch.zeros(len(rows), PAD_TO, dtype=torch.long)
        mask = torch.zeros(len(rows), PAD_TO, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask

    tokens, mask = encode(words)
    targets, target_mask = encode([w[::-1] for w in words])
    return Batch(tokens, mask, targets.masked_fill(target_mask == 0, -100))


def mirror_attention(patterns: list[Tensor], batch: Batch) -> Tensor:
    """Mean cross-attention mass on the mirror position (decoder i -> encoder n-1-i), best head per layer."""
    lengths = batch.mask.sum(1) - 1  # characters, without EOS
    pos = torch.arange(PAD_TO)
    mirror = (lengths[:, None] - 1 - pos[None, :]).clamp(min=0)  # [B, D]
    valid = (pos[None, :] < lengths[:, None]).float()  # decoder positions that emit a character
    best = []
    for pattern in patterns:  # [B, H, D, E]
        mass = pattern.detach().gather(3, mirror[:, None, :, None].expand(-1, pattern.shape[1], -1, 1))[..., 0]
        best.append(((mass * valid[:, None]).sum((0, 2)) / valid.sum()).max())
    return torch.stack(best).max()


@torch.no_grad()
def exact_match_accuracy(model, words: list[str], batch_size: int = 250) -> float:
    """Fraction of words whose greedy generation is exactly their reversal."""
    correct = 0
    for start in range(0, len(words), batch_size):
        chunk = words[start : start + batch_size]
        outputs = model.generate(chunk, max_new_tokens=PAD_TO + 1, return_type="str")
        correct += sum(out == w[::-1] for out, w in zip(outputs, chunk))
    return correct / len(words)
