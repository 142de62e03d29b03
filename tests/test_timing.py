"""The demo's and benchmarks' timing: warm-up until stable, interleaved rounds, median with its spread, noisy
flagged, the machine's load beside it."""

from __future__ import annotations

import itertools
import random
import re
import time

from t5hooks import timing


def sleeper(schedule_ms):
    """A row whose successive calls take `schedule_ms` (then its last value forever)."""
    it = itertools.chain(schedule_ms, itertools.repeat(schedule_ms[-1]))

    def call():
        time.sleep(next(it) / 1000)

    return call


def test_warm_up_absorbs_slow_first_calls_and_the_median_is_the_steady_state():
    # the case: a first call 100x slower (lazy init) must not reach the table
    rows = [("cold start", sleeper([300, 120, 60, 3])), ("steady", sleeper([3]))]
    result = timing.time_rows(rows, repeats=7)
    cold, steady = result["cold start"], result["steady"]
    assert cold.warmup_calls >= 6 and steady.warmup_calls >= 3  # 4 slow calls, then 3 agreeing ones
    assert cold.median_ms < 30 and abs(cold.median_ms - steady.median_ms) < 20
    assert cold.samples == steady.samples == 7


def test_a_wide_spread_is_flagged_noisy():
    pick = random.Random(0)
    jumpy = (pick.choice([5, 40]) for _ in itertools.count())  # never settles: 5 or 40 ms at random (seeded)

    def noisy():
        time.sleep(next(jumpy) / 1000)

    result = timing.time_rows([("jumpy", noisy), ("steady", sleeper([10]))], repeats=8, warmup=2)
    assert result["jumpy"].noisy and result["jumpy"].cell().endswith("noisy")
    assert not result["steady"].noisy and "±" in result["steady"].cell()


def test_rounds_are_interleaved_in_rotating_order_and_bounded_by_the_budget():
    order = []
    rows = [(name, (lambda n=name: order.append(n))) for name in "abc"]
    timing.time_rows(rows, repeats=3, warmup=0)
    # each timed call follows an untimed one of the same row (after timing.SETTLE_S idle)
    assert order == [n for n in "abcbcacab" for _ in range(2)]
    start = time.perf_counter()
    result = timing.time_rows([("slow", sleeper([50]))], repeats=100, warmup=1, budget_s=0.1)
    assert result["slow"].samples == timing.MIN_ROUNDS and time.perf_counter() - start < 2


def test_machine_load_is_printed_with_the_core_count():
    assert re.fullmatch(r"load \d+\.\d on \d+ cores", timing.machine_load())
