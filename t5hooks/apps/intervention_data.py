"""Token batches for training interventions: the embedded reversal task's words, or the user's files.

* words (t5hooks-tiny): random lowercase words, labels = their reversal.
* char targets: per encoder position, the character's index 0-25 (-100 elsewhere): a probe target.
* character swap: base and source words of one length; the counterfactual label is base's reversal with the
  character at `position` taken from source (a DAS target).
* text / JSONL files for other models.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from .reversal_task import make_batch, random_word

Batch = dict[str, Tensor]


def word_batches(tokenizer, batch_size: int, seed: int = 0) -> Iterator[Batch]:
    rng = random.Random(seed)
    while True:
        b = make_batch([random_word(rng) for _ in range(batch_size)], tokenizer)
        yield {"input": b.tokens, "one_zero_attention_mask": b.mask, "labels": b.labels}


def char_target_batches(tokenizer, batch_size: int, seed: int = 0) -> Iterator[Batch]:
    a = tokenizer.encode("a")[0]
    for batch in word_batches(tokenizer, batch_size, seed):
        targets = (batch["input"] - a).masked_fill(batch["one_zero_attention_mask"] == 0, -100)
        batch["targets"] = targets.masked_fill((targets < 0) | (targets >= 26), -100)
        yield batch


def char_swap_batches(tokenizer, batch_size: int, position: int, seed: int = 0) -> Iterator[Batch]:
    rng = random.Random(seed)
    while True:
        words = []
        while len(words) < batch_size:
            w = random_word(rng)
            if len(w) > position:
                words.append(w)
        sources = ["".join(rng.choice(string.ascii_lowercase) for _ in w) for w in words]
        counterfactual = [w[:position] + s[position] + w[position + 1 :] for w, s in zip(words, sources)]
        b, s, c = (make_batch(x, tokenizer) for x in (words, sources, counterfactual))
        yield {
            "input": b.tokens,
            "one_zero_attention_mask": b.mask,
            "source_input": s.tokens,
            "source_attention_mask": s.mask,
            "labels": c.labels,
        }


def _encode(tokenizer, texts: list[str]) -> tuple[Tensor, Tensor]:
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def text_file_batches(
    path: str | Path, tokenizer, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
) -> Iterator[Batch]:
    """Lines of a text file, shuffled per epoch (seeded), as encoder inputs (decoder: the start token). Under
    torchrun each rank reads every `world_size`-th line from its `rank`-th."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()][rank::world_size]
    if not lines:
        raise ValueError(
            f"{path}: no non-empty lines" + (f" for rank {rank} of {world_size}" if world_size > 1 else "")
        )
    rng = random.Random(seed)
    while True:
        order = lines[:]
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size) or [0]:
            tokens, mask = _encode(tokenizer, order[i : i + batch_size])
            yield {"input": tokens, "one_zero_attention_mask": mask, "labels": tokens.masked_fill(mask == 0, -100)}


def jsonl_records(path: str | Path, keys: tuple[str, ...], rank: int = 0, world_size: int = 1) -> list[dict]:
    """The records of a JSONL file (each with `keys`); under torchrun every `world_size`-th from the `rank`-th."""
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from None
        missing = [k for k in keys if k not in record]
        if missing:
            raise ValueError(f"{path}:{n}: missing keys {missing}; each line needs {list(keys)}")
        records.append(record)
    records = records[rank::world_size]
    if not records:
        raise ValueError(f"{path}: no records" + (f" for rank {rank} of {world_size}" if world_size > 1 else ""))
    return records


def jsonl_label_batches(
    path: str | Path, tokenizer, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
) -> Iterator[Batch]:
    """`{"text": ..., "label": int}` lines: every real token of the text gets the label (probe targets)."""
    records = jsonl_records(path, ("text", "label"), rank, world_size)
    rng = random.Random(seed)
    while True:
        chunk = [rng.choice(records) for _ in range(batch_size)]
        tokens, mask = _encode(tokenizer, [r["text"] for r in chunk])
        labels = torch.tensor([int(r["label"]) for r in chunk])[:, None].expand_as(tokens)
        yield {"input": tokens, "one_zero_attention_mask": mask, "targets": labels.masked_fill(mask == 0, -100)}


def jsonl_interchange_batches(
    path: str | Path, tokenizer, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
) -> Iterator[Batch]:
    """`{"base": ..., "source": ..., "target": ...}` lines (texts; base and source padded to one length)."""
    records = jsonl_records(path, ("base", "source", "target"), rank, world_size)
    rng = random.Random(seed)
    while True:
        chunk = [rng.choice(records) for _ in range(batch_size)]
        tokens, mask = _encode(tokenizer, [r["base"] for r in chunk] + [r["source"] for r in chunk])
        targets, target_mask = _encode(tokenizer, [r["target"] for r in chunk])
        yield {
            "input": tokens[:batch_size],
            "one_zero_attention_mask": mask[:batch_size],
            "source_input": tokens[batch_size:],
            "source_attention_mask": mask[batch_size:],
            "labels": targets.masked_fill(target_mask == 0, -100),
        }
