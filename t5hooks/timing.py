"""Wall-clock timing for the demo and the benchmarks: medians of repeated calls, rows interleaved."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def interleaved_medians(
    rows: Sequence[tuple[str, Callable[[], object]]], repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median ms per row, timing the rows round-robin so drift in the machine's load hits every row alike
    (CUDA is synchronised around each call)."""
    for _, fn in rows:
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name, _ in rows}
    for _ in range(repeats):
        for name, fn in rows:
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def median_ms(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> float:
    """Median ms of `repeats` calls of `fn` after `warmup` calls."""
    return interleaved_medians([("fn", fn)], repeats, warmup)["fn"]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
