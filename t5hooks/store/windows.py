"""One window of prompts: tokenised (empty and over-long prompts refused unless skipped / truncated), cut into
token-budget batches, run, and gathered into the shard's rows (real tokens only, ordered by doc, then pos)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import torch
from torch import Tensor

from .batching import padded_tokens, plan_batches
from .format import AXES, INDEX_DTYPES, index_key
from .runner import CaptureRunner, Encoded
from .sources import Prompt


def encode_window(
    chunk: list[Prompt],
    tokenizer: Any,
    eos: int | None,
    start_id: int,
    max_tokens: int,
    truncate: bool,
    skip_empty: bool,
) -> tuple[list[Encoded], int]:
    """Tokenise one window; empty and over-long prompts are errors unless skipped / truncated."""
    kept = []
    for p in chunk:
        if not p.text.strip():
            if skip_empty:
                continue
            raise ValueError(
                f"prompt {p.doc} (line {p.doc + 1}) is empty; pass skip_empty=True (--skip-empty) to skip empty prompts"
            )
        kept.append(p)
    if not kept:
        return [], len(chunk)
    ids = _tokenize(tokenizer, [p.text for p in kept])
    has_dec = any(p.decoder_text is not None for p in kept)
    dec_ids = _tokenize(tokenizer, [p.decoder_text or "" for p in kept]) if has_dec else None
    out = []
    for i, p in enumerate(kept):
        toks = _fit(ids[i], p, "prompt", eos, max_tokens, truncate)
        dec = None
        if dec_ids is not None:  # teacher forcing: start token, then the target without its last token
            labels = _fit(dec_ids[i], p, "decoder target", eos, max_tokens, truncate)
            dec = [start_id, *labels[:-1]]
        out.append(Encoded(p.doc, toks, dec))
    return out, len(chunk) - len(kept)


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    ids = tokenizer(texts, padding=False)["input_ids"]
    return [list(map(int, row)) for row in ids]


def _fit(ids: list[int], p: Prompt, what: str, eos: int | None, max_tokens: int, truncate: bool) -> list[int]:
    if len(ids) <= max_tokens:
        return ids
    if not truncate:
        raise ValueError(
            f"{what} {p.doc} (line {p.doc + 1}) has {len(ids)} tokens > max_tokens={max_tokens}; pass "
            f"truncate=True (--truncate) to cut it, or raise max_tokens (--max-tokens)"
        )
    if eos is not None and ids[-1] == eos:  # keep the end-of-sequence token, as tokenizers do when truncating
        return [*ids[: max_tokens - 1], eos]
    return ids[:max_tokens]


def chunks(prompts: Iterator[Prompt], size: int) -> Iterator[list[Prompt]]:
    while chunk := list(islice(prompts, size)):
        yield chunk


def run_window(
    runner: CaptureRunner,
    encoded: list[Encoded],
    axes: dict[str, str],
    token_budget: int,
    max_batch: int | None,
    pad_id: int,
    storage: torch.dtype,
    on_batch: Callable[[int], Any] | None = None,
) -> tuple[dict[str, Tensor], int, int]:
    """All batches of one window -> the shard's tensors (rows ordered by doc, then pos). `on_batch(prompts)`
    after each batch (progress)."""
    used_axes = [a for a in AXES if a in axes.values()]
    lengths = [len(e.tokens) for e in encoded]
    batches = plan_batches(lengths, token_budget, max_batch)
    parts: dict[str, list[Tensor]] = {}
    for batch in batches:
        items = [encoded[i] for i in batch]
        out, inputs = runner.run(items, pad_id)
        for axis in used_axes:
            tokens, mask = inputs[axis]  # [B,L], [B,L] bool (real tokens)
            docs = torch.tensor([e.doc for e in items], dtype=INDEX_DTYPES["doc"])[:, None].expand_as(tokens)
            pos = torch.arange(tokens.shape[1], dtype=INDEX_DTYPES["pos"])[None].expand_as(tokens)
            parts.setdefault(index_key(axis, "doc"), []).append(docs[mask])
            parts.setdefault(index_key(axis, "pos"), []).append(pos[mask])
            parts.setdefault(index_key(axis, "token_id"), []).append(tokens[mask].to(INDEX_DTYPES["token_id"]))
        for name, axis in axes.items():
            act = out[name]  # [B,L,*shape]
            _, mask = inputs[axis]
            if act.shape[:2] != mask.shape:
                raise RuntimeError(f"{name} has shape {tuple(act.shape)}; expected [batch, {axis} positions, ...]")
            parts.setdefault(name, []).append(act[mask.to(act.device)].to("cpu", storage))
        if on_batch is not None:
            on_batch(len(items))
    rows: dict[str, Tensor] = {}
    for axis in used_axes:
        if not batches:  # every prompt of the window was skipped: an empty shard keeps the windows contiguous
            for column, dtype in INDEX_DTYPES.items():
                rows[index_key(axis, column)] = torch.zeros(0, dtype=dtype)
            for name in (n for n, a in axes.items() if a == axis):
                rows[name] = torch.zeros(0, *runner.shapes[name], dtype=storage)
            continue
        order = torch.argsort(torch.cat(parts[index_key(axis, "doc")]), stable=True)  # back to source order
        for key in [
            *(index_key(axis, c) for c in ("doc", "pos", "token_id")),
            *(n for n, a in axes.items() if a == axis),
        ]:
            rows[key] = torch.cat(parts[key])[order]
    real = sum(lengths)
    return rows, real, padded_tokens(lengths, batches)
