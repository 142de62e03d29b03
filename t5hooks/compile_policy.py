"""Does compiling pay? Eager or compiled, chosen from the job's size and what compiling costs on this machine.

Compiling costs seconds to minutes up front (much less when `compile_cache` holds the artefacts) and buys a
per-step speed-up that depends on the device and the work: on a CPU the matmuls dominate and compiled steps
are little faster than eager ones; on a GPU compilation removes Python and launch overhead. A job compiles
only when the time it is expected to save exceeds the time compiling is expected to take:

    steps * eager_step_s * (1 - 1 / speedup) > compile_s

`speedup` and `compile_s` come from measurements kept beside the compile cache entry (the last compiled run
of the same work on this machine records them) and otherwise from the defaults below, measured on the
machines named there. `compile=True/False` (or `backend=`) in the callers always overrides the choice.

API for callers (trainers, `extract`):
    cost = expected_cost(cache, device_type, training)      # CompileCost(compile_s, speedup, basis)
    if compile_pays(eager_step_s, steps, cost): ...
    cost.describe()                                          # "about 25 s (measured here ...)"
    announce(what, cost)                                     # prints the line users see before compiling
    with first_compile(what, cache, cost): fn(...)           # the first call: warm start, announce, time, save
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from .compile_cache import CompileCache

# Defaults when nothing was measured on this machine yet: (work, device type, training) -> (cold s, warm s,
# speedup). "capture": the t5-small-shape capture (every hook_resid_post), `t5hooks bench compiling` on a quiet
# 2-core AMD EPYC (Zen 3), torch 2.13, regional: cold compile, warm compile (artefacts loaded, inductor's own
# cache empty), and compiled step / eager step (benchmarks/RESULTS.md). A CPU job compiles only when its eager
# work is long enough for a 5-8 % saving to repay the compile (for extraction: about ten minutes of eager
# forwards). "sae": one SAE's training step (`t5hooks bench sae --compile` on a 2-core Intel Xeon with AVX-512:
# compiled TopK and BatchTopK 0.93-1.04x their eager steps, ReLU 1.26x; a run that measures less than 1x records
# it, and later runs stay eager). CUDA: no GPU was available to measure; these are conservative placeholders that
# make short jobs run eagerly, and the first compiled run records the real numbers for this machine.
DEFAULTS: dict[tuple[str, str, bool], tuple[float, float, float]] = {
    ("capture", "cpu", False): (44.0, 22.0, 1.08),
    ("capture", "cpu", True): (148.0, 55.0, 1.05),
    ("capture", "cuda", False): (60.0, 10.0, 1.2),
    ("capture", "cuda", True): (90.0, 15.0, 1.2),
    ("sae", "cpu", True): (7.0, 3.0, 1.04),
    ("sae", "cuda", True): (30.0, 5.0, 1.2),
}


@dataclass(frozen=True)
class CompileCost:
    """What compiling is expected to cost and buy: `compile_s` until the compiled function is ready,
    `speedup` = eager step time / compiled step time, and where both numbers come from."""

    compile_s: float
    speedup: float
    warm: bool  # the compile cache holds this work's artefacts
    basis: str

    def describe(self) -> str:
        kind = "from the compile cache" if self.warm else "first compile of this work here"
        return f"about {self.compile_s:.0f} s ({kind}; {self.basis})"


def expected_cost(cache: CompileCache | None, device_type: str, training: bool, work: str = "capture") -> CompileCost:
    """The expected compile time and speed-up of the work `cache` is keyed by (`work`: "capture" | "sae"),
    measured when possible."""
    cold, warm_s, speedup = DEFAULTS.get((work, device_type, training), DEFAULTS[(work, "cuda", training)])
    measured: dict[str, Any] = cache.measurements() if cache is not None else {}
    warm = cache is not None and cache.exists()
    compile_s = measured.get("warm_s" if warm else "cold_s")
    if compile_s is None and warm and "cold_s" in measured:
        compile_s = min(measured["cold_s"], warm_s)
    basis_parts = []
    if compile_s is None:
        compile_s = warm_s if warm else cold
        basis_parts.append("compile time: default estimate")
    else:
        basis_parts.append("compile time: measured here")
    if "speedup" in measured:
        speedup = float(measured["speedup"])
        basis_parts.append("speed-up: measured here")
    else:
        basis_parts.append(f"speed-up: default {speedup:g}x for {device_type}")
    return CompileCost(float(compile_s), float(speedup), warm, ", ".join(basis_parts))


def compile_pays(eager_step_s: float, steps: int, cost: CompileCost) -> bool:
    """True when `steps` more steps at `eager_step_s` each save more than compiling costs."""
    if cost.speedup <= 1.0:
        return False
    return steps * eager_step_s * (1.0 - 1.0 / cost.speedup) > cost.compile_s


def announce(what: str, cost: CompileCost | None, stream: TextIO | None = None) -> None:
    """The line shown before a compile starts, so a silent minute is never a mystery."""
    expected = cost.describe() if cost is not None else "duration unknown"
    print(f"t5hooks: compiling {what}: {expected} ...", file=stream or sys.stderr, flush=True)


@contextlib.contextmanager
def first_compile(
    what: str, entry: CompileCache | None, cost: CompileCost | None, *, show: bool = True
) -> Iterator[dict]:
    """Around the first call of a compiled function: load the warm-start artefacts of `entry`, announce the
    compile (`show`), compile the backward now rather than at the first `.backward()` (so the announced time is
    the whole cost), then save the artefacts and record the measured time beside them. Yields a dict that
    receives `seconds` and `warm` (whether the artefacts were there)."""
    from torch._functorch import config as functorch_config

    warm = entry.load() if entry is not None else False
    if show:
        announce(what, cost)
    result: dict[str, Any] = {}
    start = time.perf_counter()
    with functorch_config.patch(force_non_lazy_backward_lowering=True):
        yield result
    result.update(seconds=time.perf_counter() - start, warm=warm)
    if entry is not None:
        entry.save()
        entry.record(**{"warm_s" if warm else "cold_s": round(result["seconds"], 2)})


class SwitchWhenPaid:
    """For a loop that starts eagerly and may switch to a compiled function: `observe` each eager step's seconds
    and work (tokens, rows), then `should_compile(remaining_work)` says whether to compile now; after the switch,
    `observe_compiled` times the compiled steps and keeps the measured speed-up in `record` (the work's
    `CompileCache` entry), so the next decision on this machine uses it instead of the default.

    With the remaining work known, it compiles when that work at eager speed saves more than compiling costs.
    With it unknown (a streamed corpus), it compiles once the eager time already spent, times the fraction a
    compiled step would save, reaches the compile cost (the break-even rule: never more than twice the time of
    the best choice made in hindsight). A speed-up of 1 or less never compiles. The first `settle` steps are
    not counted (they include one-off warm-up costs)."""

    MEASURED_STEPS = 3  # compiled steps timed (after the first, which compiles) before the speed-up is recorded

    def __init__(self, cost: CompileCost, settle: int = 1, record: CompileCache | None = None) -> None:
        self.cost = cost
        self.settle = settle
        self.record = record
        self.steps = 0
        self.seconds = 0.0
        self.work = 0.0
        self.compiled_steps: list[tuple[float, float]] = []  # (seconds, work) of compiled steps

    def observe(self, seconds: float, work: float) -> None:
        self.steps += 1
        if self.steps > self.settle:
            self.seconds += seconds
            self.work += work

    @property
    def eager_rate(self) -> float | None:
        """Measured eager seconds per unit of work (None until a step was counted)."""
        return self.seconds / self.work if self.work > 0 else None

    def should_compile(self, remaining_work: float | None) -> bool:
        rate = self.eager_rate
        if rate is None or self.cost.speedup <= 1.0:
            return False
        saving = 1.0 - 1.0 / self.cost.speedup
        if remaining_work is not None:
            return remaining_work * rate * saving > self.cost.compile_s
        return self.seconds * saving >= self.cost.compile_s

    def observe_compiled(self, seconds: float, work: float) -> None:
        """A compiled step's seconds and work; after `MEASURED_STEPS` of them (the first one compiles and is not
        counted) the measured speed-up over the eager steps is written to `record`."""
        self.compiled_steps.append((seconds, work))
        measured = self.compiled_steps[1:]
        if len(measured) == self.MEASURED_STEPS and self.eager_rate is not None and self.record is not None:
            rate = sum(s for s, _ in measured) / sum(w for _, w in measured)
            self.record.record(speedup=round(self.eager_rate / rate, 3))
