"""Wall-clock timing for the demo and the benchmarks: rows interleaved, each warmed up until its time is stable,
reported as the median with its spread, beside the machine's load.

One warm-up call and a handful of repeats on a busy machine gave "eager forward 970 ms" on one run and 13 ms on
the next. Here every row is first called until three consecutive times agree within `STABLE` (caches, lazy
initialisation and allocator growth are behind it), then rows are timed round-robin in rotating order, so drift
in the machine's load hits every row alike, until each row has `repeats` samples. A row whose interquartile
spread exceeds `NOISY` of its median is flagged: its number says more about the machine than about the code.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

STABLE = 0.2  # warm-up ends when three consecutive calls lie within 20% of their median
NOISY = 0.25  # interquartile spread above 25% of the median: the row is flagged noisy
WARMUP_MAX_CALLS, WARMUP_MAX_S = 50, 5.0  # per row, whichever comes first
MIN_ROUNDS = 5  # interleaved rounds run whatever the time budget
# When rows alternate, each timed call comes after SETTLE_S idle and one untimed call of the same row. Thread
# pools spin after a call (OpenMP's in torch, ONNX Runtime's intra-op pool, OpenBLAS's in NumPy) and take cores
# from whatever runs next: measured on the 2-core AMD EPYC, a 1024x512x2048 torch GEMM took 21 ms alone, 42-49
# ms right after an ORT or NumPy call, still 42-48 ms 10 ms later, and 21 ms after 0.2 s. The untimed call
# then wakes the row's own threads, so a millisecond-sized row is timed as it runs in a loop, not waking up.
SETTLE_S = 0.2


@dataclass(frozen=True)
class Timing:
    """One row: the median ms and the interquartile range (ms) over `samples` interleaved calls."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    samples: int
    warmup_calls: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3_ms - self.q1_ms) / self.median_ms if self.median_ms > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY

    def cell(self) -> str:
        """`12.3 ± 0.4` (median ± half the interquartile range), `noisy` appended when the spread is wide."""
        text = f"{self.median_ms:.2f} ± {(self.q3_ms - self.q1_ms) / 2:.2f}"
        return f"{text} noisy" if self.noisy else text


def time_rows(
    rows: Sequence[tuple[str, Callable[[], object]]],
    repeats: int = 15,
    warmup: int | None = None,
    budget_s: float | None = None,
) -> dict[str, Timing]:
    """Time each `(name, fn)`: warmed up until stable (or with exactly `warmup` calls), then `repeats`
    interleaved rounds (CUDA synchronised around each call; with several rows, each timed call follows
    `SETTLE_S` idle and an untimed call of the same row); with `budget_s`, rounds stop once it is spent and at least `MIN_ROUNDS` were run (a slow,
    busy machine still finishes)."""
    warmups = {name: warm_up(fn) if warmup is None else _calls(fn, warmup) for name, fn in rows}
    times: dict[str, list[float]] = {name: [] for name, _ in rows}
    start = time.perf_counter()
    for r in range(repeats):
        if budget_s is not None and r >= MIN_ROUNDS and time.perf_counter() - start > budget_s:
            break
        shift = r % len(rows)
        for name, fn in [*rows[shift:], *rows[:shift]]:  # rotating order: no row always runs first
            if len(rows) > 1:
                time.sleep(SETTLE_S)  # the previous row's spinning threads go idle first
                fn()  # and this row's own threads are awake
            times[name].append(_call_ms(fn))
    out = {}
    for name, samples in times.items():
        q = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
        out[name] = Timing(statistics.median(samples), q[0], q[2], len(samples), warmups[name])
    return out


def warm_up(fn: Callable[[], object]) -> int:
    """Call `fn` until three consecutive times lie within `STABLE` of their median (at most `WARMUP_MAX_CALLS`
    calls or `WARMUP_MAX_S` seconds); returns the number of calls."""
    recent: list[float] = []
    start = time.perf_counter()
    for calls in range(1, WARMUP_MAX_CALLS + 1):
        recent = [*recent[-2:], _call_ms(fn)]
        if len(recent) == 3:
            mid = statistics.median(recent)
            if max(recent) - min(recent) <= STABLE * mid:
                return calls
        if time.perf_counter() - start > WARMUP_MAX_S:
            return calls
    return WARMUP_MAX_CALLS


def machine_load() -> str:
    """`load 3.1 on 2 cores` (the 1-minute load average), for printing beside any timing."""
    cores = os.cpu_count() or 1
    try:
        return f"load {os.getloadavg()[0]:.1f} on {cores} cores"
    except OSError:  # not available on this platform: say so
        return f"load unknown, {cores} cores"


def interleaved_medians(
    rows: Sequence[tuple[str, Callable[[], object]]], repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median ms per row after `warmup` calls each (`time_rows` with a fixed warm-up, for benchmarks that
    warm up themselves)."""
    return {name: t.median_ms for name, t in time_rows(rows, repeats, warmup).items()}


def median_ms(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> float:
    """Median ms of `repeats` calls of `fn` after `warmup` calls."""
    return interleaved_medians([("fn", fn)], repeats, warmup)["fn"]


def _calls(fn: Callable[[], object], n: int) -> int:
    for _ in range(n):
        fn()
    return n


def _call_ms(fn: Callable[[], object]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return 1000 * (time.perf_counter() - start)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
