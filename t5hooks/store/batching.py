"""Token-budget batching with length bucketing over a bounded look-ahead window.

A window of prompts (the look-ahead, which is also the unit of a shard and of resumption) is sorted by
length, then cut greedily into batches whose padded size `rows * longest` stays within a token budget.
Neighbours in sorted order have similar lengths, so padding stays small without reading the corpus first.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(
    lengths: Sequence[int], token_budget: int, max_batch: int | None = None, length_slack: float = 0.25
) -> list[list[int]]:
    """Indices into `lengths`, grouped: each group's `len(group) * max(length)` <= `token_budget` (a single
    longer prompt forms its own batch), and its longest prompt is at most `length_slack` (+8 tokens) longer
    than its shortest, so no prompt is padded by much. Deterministic: sorted by (length, index)."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending: the newest member is the longest
        if current:
            shortest = lengths[current[0]]
            fits = (len(current) + 1) * lengths[i] <= token_budget
            fits &= lengths[i] <= shortest * (1 + length_slack) + 8
            fits &= max_batch is None or len(current) < max_batch
            if not fits:
                batches.append(current)
                current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padded_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Tokens the model computes for these batches (real + padding)."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)
