"""Test helper: the peak resident memory of a piece of work, for checking that loading streams (Linux only).

`VmHWM` (the process's peak resident set) is reset to the current resident size by writing "5" to
`/proc/self/clear_refs`; the growth of the peak over the starting size is what the work needed at most,
including pages of memory-mapped files it touched. Python's tracemalloc does not see torch's allocations.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_growth_bytes(work: Callable[[], Any]) -> tuple[Any, int]:
    """`(work(), bytes the peak resident set grew by while it ran)`."""
    Path("/proc/self/clear_refs").write_text("5")
    start = _status_kib("VmRSS")
    result = work()
    return result, (_status_kib("VmHWM") - start) * 1024
