"""Plain-text summaries of a run's activations, for the command line and notebooks."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..tables import format_table


def activation_table(cache: Mapping[str, Tensor], patterns: Sequence[str] = ("*",)) -> str:
    """Name, shape, dtype and RMS norm per position of the cached activations matching `patterns`."""
    rows = []
    for name, t in cache.items():
        if not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        t = t.detach().float()
        rms = t.pow(2).mean().sqrt().item()
        rows.append((name, list(t.shape), rms_format(rms), rms_format(t.abs().max().item())))
    return format_table(rows, ("hook point", "shape", "rms", "max |x|"))


def rms_format(x: float) -> str:
    return f"{x:.4g}"


def strongest_attention_links(
    cache: Mapping[str, Tensor],
    query_tokens: dict[str, Sequence[str]],
    key_tokens: dict[str, Sequence[str]],
    k: int = 8,
    batch_index: int = 0,
) -> str:
    """The `k` largest attention weights over all cached patterns, as 'layer head: query token -> key token'
    (leaving out links forced by having a single visible key: one-key patterns, the first causal query).

    `query_tokens` / `key_tokens` map "encoder" / "decoder" to the token strings of that side.
    """
    links = []
    for name, pattern in cache.items():
        if not name.endswith("hook_pattern"):
            continue
        stack = name.split(".")[0]
        cross = ".cross_attn." in name
        q_side = stack
        k_side = "encoder" if cross else stack
        p = pattern[batch_index] if pattern.ndim == 4 else pattern  # [H,Q,K]
        H, Q, K = p.shape
        if K == 1:
            continue  # a single key gets all the weight: not informative
        if stack == "decoder" and not cross:
            p = p.clone()
            p[:, 0] = 0  # causal: the first query sees only itself
        values, flat = p.reshape(-1).float().topk(min(k, p.numel()))
        for value, index in zip(values.tolist(), flat.tolist()):
            h, rem = divmod(index, Q * K)
            qi, ki = divmod(rem, K)
            kind = "cross" if cross else "self"
            links.append(
                (
                    value,
                    f"{stack}.{name.split('.')[1]} {kind} H{h}",
                    _tok(query_tokens, q_side, qi),
                    _tok(key_tokens, k_side, ki),
                )
            )
    links.sort(key=lambda row: -row[0])
    rows = [(where, f"{q} -> {kk}", f"{v:.3f}") for v, where, q, kk in links[:k]]
    return format_table(rows, ("layer / head", "query -> key", "weight"))


def _tok(tokens: dict[str, Sequence[str]], side: str, index: int) -> str:
    seq = tokens.get(side)
    if seq is None or index >= len(seq):
        return f"[{index}]"
    return f"{seq[index]!r}@{index}"


def top_predictions(logits: Tensor, decode, k: int = 5, batch_index: int = 0) -> str:
    """Top-k next tokens (with probabilities) at each decoder position."""
    probs = torch.softmax(logits[batch_index].float(), dim=-1)
    rows = []
    for pos in range(probs.shape[0]):
        values, ids = probs[pos].topk(k)
        rows.append((pos, "  ".join(f"{decode(i)!r} {v:.2f}" for v, i in zip(values.tolist(), ids.tolist()))))
    return format_table(rows, ("decoder pos", f"top-{k} next tokens"))
