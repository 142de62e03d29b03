"""Train the embedded `t5hooks-tiny` model: a byte-level T5 that reverses short lowercase strings.

Reversal has a mechanism you can see: decoder position i must read encoder position n-1-i, so
the cross-attention learns an anti-diagonal alignment. The training step runs the capture
module under `torch.compile`, reading the cross-attention patterns as explicit outputs to
report how much attention mass sits on the mirror position.

    t5hooks train-tiny --out my-tiny.safetensors

`--out` is checked before training and written (atomically) only when the held-out accuracy reaches
`--min-accuracy`. Load the result with `load_tiny(HookedEncoderDecoder, "my-tiny.safetensors")`.
The shipped weights in `t5hooks/assets/` are replaced only by a maintainer, deliberately
(`--out t5hooks/assets/t5hooks-tiny.safetensors --force`), never by accident.
"""

from __future__ import annotations

import math
import random
import string
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..pretrained import save_tiny, tiny_config
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


def train_tiny(
    out: str | Path | None = None,
    steps: int = 1200,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    compile: bool = True,
    progress: bool = True,
    min_accuracy: float = 0.0,
    overwrite: bool = True,
):
    """Train t5hooks-tiny from scratch; returns (model, held-out accuracy).

    With `out`, writes safetensors there (atomically) only if the accuracy is at least `min_accuracy`;
    `out` is checked for writability before training (`overwrite=False`: it must not exist yet)."""
    from ..atomic import check_writable
    from ..model import HookedEncoderDecoder

    if out is not None:
        check_writable(out, overwrite=overwrite)

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = ByteTokenizer()
    held_out = set(held_out_words())
    model = HookedEncoderDecoder(tiny_config(seed=seed), tokenizer=tokenizer)
    cross = [f"decoder.{l}.cross_attn.hook_pattern" for l in range(model.cfg.n_decoder_layers)]
    cap = model.capture(cross)
    step_fn = torch.compile(cap, fullgraph=True) if compile else cap
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    bar = _progress(steps, progress)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        words = []
        while len(words) < batch_size:
            w = random_word(rng)
            if w not in held_out:
                words.append(w)
        batch = make_batch(words, tokenizer)
        out_dict = step_fn(batch.tokens, one_zero_attention_mask=batch.mask, labels=batch.labels)
        loss = out_dict["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            align = mirror_attention([out_dict[n] for n in cross], batch)
            bar.set_postfix(loss=f"{loss.item():.4f}", mirror_attn=f"{align.item():.2f}")
        bar.update(1)
    bar.close()
    model.eval()
    accuracy = exact_match_accuracy(model, sorted(held_out))
    minutes = (time.perf_counter() - start) / 60
    if progress:
        print(
            f"trained {steps} steps in {minutes:.1f} min; held-out exact-match accuracy {accuracy:.2%} "
            f"({len(held_out)} strings)"
        )
    if out is not None and accuracy >= min_accuracy:
        save_tiny(
            model,
            out,
            {
                "held_out_accuracy": accuracy,
                "train_minutes": round(minutes, 2),
                "steps": steps,
                "task": f"reverse lowercase strings of {MIN_LEN}-{MAX_LEN} characters",
            },
            overwrite=overwrite,
        )
    return model, accuracy


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="train-tiny", unit="step")
