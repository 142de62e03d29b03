"""Attention views: encoder self-attention, decoder self-attention and cross-attention of one example, with
layer and head pickers, the pattern of one head or the mean of several, and the value of every
(query, key) pair on hover. Padded positions are left out.

Built from cached `hook_pattern`s (`cache.attention_view(...)`, `model.attention_view(input, decoder_input)`);
this module only needs the patterns and the token strings, so the analysis layer can call it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .page import View, floats

KINDS = ("encoder", "decoder", "cross")  # encoder self-, decoder self-, cross-attention
_AXES = {"encoder": ("encoder", "encoder"), "decoder": ("decoder", "decoder"), "cross": ("decoder", "encoder")}
MAX_VALUES = 4_000_000  # numbers one page may embed (about 40 MB of JSON); pick layers for more


class AttentionView(View):
    """Attention patterns of one example as an interactive page (`.html()`, `.save(path)`, `_repr_html_`).

    `data["attention"][kind]` holds `layers` and `patterns` `[layer][head][query][key]` for `kind` in
    "encoder", "decoder", "cross"; `data["tokens"]` / `data["positions"]` the shown tokens of each stack
    and their positions in the input (padding removed)."""

    kind = "attention"
    height = 760


def pattern_kind(name: str) -> tuple[str, int] | None:
    """("encoder" | "decoder" | "cross", layer) for a `hook_pattern` name, else None."""
    parts = name.split(".")
    if len(parts) != 4 or parts[3] != "hook_pattern" or not parts[1].isdigit():
        return None
    stack, layer, module = parts[0], int(parts[1]), parts[2]
    if module == "attn" and stack in ("encoder", "decoder"):
        return stack, layer
    if module == "cross_attn" and stack == "decoder":
        return "cross", layer
    return None


def attention_view(
    activations: Mapping[str, Tensor],
    *,
    has_batch_dim: bool = True,
    batch_index: int = 0,
    tokens: Mapping[str, Sequence[str] | None] | None = None,
    masks: Mapping[str, Tensor | None] | None = None,
    kinds: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    title: str = "Attention",
) -> AttentionView:
    """An `AttentionView` from cached patterns (`{name: [batch, H, Q, K]}`, or `[H, Q, K]` without batch dim).

    `tokens`: per stack ("encoder", "decoder") one string per position (None: positions only); `masks`: per
    stack a `[batch, pos]` (or `[pos]`) 1/0 mask, whose 0 positions are hidden. `kinds` / `layers` narrow
    what is shown (default: every pattern in `activations`)."""
    tokens = dict(tokens or {})
    masks = dict(masks or {})
    if kinds is not None:
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"kinds {bad} unknown; valid: {', '.join(KINDS)}")
    found: dict[str, dict[int, Tensor]] = {}
    for name, value in activations.items():
        parsed = pattern_kind(name)
        if parsed is None:
            continue
        kind, layer = parsed
        if (kinds is not None and kind not in kinds) or (layers is not None and layer not in layers):
            continue
        pattern = value.detach()
        if has_batch_dim:
            if not -pattern.shape[0] <= batch_index < pattern.shape[0]:
                raise ValueError(f"batch_index={batch_index} is out of range for a batch of {pattern.shape[0]}")
            pattern = pattern[batch_index]
        if pattern.ndim != 3:
            raise ValueError(f"{name} has shape {tuple(value.shape)}; expected [batch, heads, query, key]")
        found.setdefault(kind, {})[layer] = pattern
    if not found:
        raise ValueError(
            "no attention patterns to show: cache the `hook_pattern` points (e.g. names_filter=lambda n: "
            "n.endswith('hook_pattern')) and check `kinds` / `layers`"
        )
    lengths: dict[str, int] = {}
    for kind, per_layer in found.items():
        q_stack, k_stack = _AXES[kind]
        some = next(iter(per_layer.values()))
        for stack, size in ((q_stack, some.shape[1]), (k_stack, some.shape[2])):
            if lengths.setdefault(stack, size) != size:
                raise ValueError(f"{stack} patterns disagree on the number of positions ({lengths[stack]} vs {size})")
    keep = {stack: _kept(masks.get(stack), n, stack, has_batch_dim, batch_index) for stack, n in lengths.items()}
    labels: dict[str, list[str]] = {}
    for stack, n in lengths.items():
        names = tokens.get(stack)
        if names is None:
            names = [""] * n
        names = [str(t) for t in names]
        if len(names) != n:
            raise ValueError(f"{len(names)} {stack} token strings for {n} {stack} positions")
        labels[stack] = [names[i] for i in keep[stack].tolist()]
    total = sum(
        len(p) * p[next(iter(p))].shape[0] * len(keep[_AXES[k][0]]) * len(keep[_AXES[k][1]]) for k, p in found.items()
    )
    if total > MAX_VALUES:
        raise ValueError(
            f"this view would embed {total:,} attention values (limit {MAX_VALUES:,}); choose `layers` or `kinds`"
        )
    attention = {}
    n_heads = None
    for kind in KINDS:
        if kind not in found:
            continue
        q_stack, k_stack = _AXES[kind]
        order = sorted(found[kind])
        stacked = torch.stack([found[kind][l] for l in order])  # [L, H, Q, K]
        stacked = stacked[:, :, keep[q_stack]][:, :, :, keep[k_stack]]
        n_heads = stacked.shape[1]
        attention[kind] = {"layers": order, "patterns": floats(stacked)}
    data = {
        "title": title,
        "n_heads": n_heads,
        "tokens": labels,
        "positions": {stack: keep[stack].tolist() for stack in keep},
        "attention": attention,
    }
    return AttentionView(data, title)


def _kept(mask: Tensor | None, n: int, stack: str, has_batch_dim: bool, batch_index: int) -> Tensor:  # [kept]
    if mask is None:
        return torch.arange(n)
    mask = torch.as_tensor(mask).detach().cpu()
    if mask.ndim == 2:
        mask = mask[batch_index]
    if mask.shape != (n,):
        raise ValueError(f"the {stack} mask has {tuple(mask.shape)} entries for {n} {stack} positions")
    return torch.nonzero(mask.bool()).flatten()


def token_strings(model: Any, ids: Tensor | Sequence[Any] | None, batch_index: int = 0) -> list[str] | None:
    """One string per position: strings as given, ids through the model's tokenizer (`#id` without one)."""
    if ids is None:
        return None
    if isinstance(ids, (list, tuple)) and all(isinstance(t, str) for t in ids):
        return list(ids)
    ids = torch.as_tensor(ids)
    if ids.ndim == 2:
        ids = ids[batch_index]
    if getattr(model, "tokenizer", None) is None:
        return [f"#{int(i)}" for i in ids.tolist()]
    return list(model.to_str_tokens(ids.cpu()))
