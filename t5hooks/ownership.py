"""Who owns a temporary file, a scratch folder or a lock, and whether that owner is provably gone.

A PID alone does not say: PIDs are reused (every container's first process is PID 1), and on a filesystem
shared by several hosts a PID means nothing on the others. An owner is therefore recorded as
`<pid>-<start>-<machine>`: the process's start time (clock ticks after boot, `/proc/<pid>/stat`; 0 where
unknown) and a short hash of the hostname, the boot id and the PID namespace (where `pid` names this process).
While it lives, an owner also refreshes the modification time of what it holds every `HEARTBEAT_S` seconds
(one daemon thread per process).

The rule (`is_dead`): an owner on this machine is dead when no process has its PID, or the one that has it
started at another time (the PID was reused) or is a zombie; an owner elsewhere (another host, container or
boot) is dead once what it holds has not been refreshed for `LEASE_S` seconds. Anything else is presumed
alive: cleanup removes only what it can prove abandoned.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HEARTBEAT_S = 30.0  # how often a live owner refreshes what it holds
LEASE_S = 300.0  # unrefreshed this long, a holder on another machine is dead (ten missed heartbeats)
_TAG = re.compile(r"^(?P<pid>\d+)-(?P<start>\d+)-(?P<machine>[0-9a-f]{8})$")


@dataclass(frozen=True)
class Owner:
    pid: int
    start: int  # process start time in clock ticks after boot; 0: not known on this platform
    machine: str  # 8 hex digits: hostname + boot id + PID namespace

    @property
    def tag(self) -> str:
        """`<pid>-<start>-<machine>`: safe in a file name."""
        return f"{self.pid}-{self.start}-{self.machine}"

    @classmethod
    def parse(cls, tag: str) -> Owner | None:
        m = _TAG.match(tag)
        return None if m is None else cls(int(m["pid"]), int(m["start"]), m["machine"])


def machine_id() -> str:
    """A short hash of what makes PIDs comparable: the hostname, the kernel's boot id and the PID namespace."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:8]


def process_start(pid: int) -> int | None:
    """`pid`'s start time (clock ticks after boot); None when no such process runs; 0 when it cannot be told
    (no /proc). A zombie (exited, not yet reaped) counts as not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else _start_without_proc(pid)
    except OSError:
        return 0  # hidden from us (hidepid): alive for all we know
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3, starttime field 22
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _start_without_proc(pid: int) -> int | None:
    """Without /proc (macOS, BSD): is `pid` alive (0: yes, start unknown) or not (None)."""
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C there: never probe
        return 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # someone else's process
        return 0
    return 0


_me: Owner | None = None


def me() -> Owner:
    """This process as an owner (recomputed after a fork)."""
    global _me
    if _me is None or _me.pid != os.getpid():
        pid = os.getpid()
        _me = Owner(pid, process_start(pid) or 0, machine_id())
    return _me


def is_dead(owner: Owner, held: Path, now: float | None = None) -> bool:
    """Whether `owner`, which holds `held` (a file or folder it refreshes while alive), is provably gone."""
    if owner.machine == me().machine:
        start = process_start(owner.pid)
        if start is None:
            return True
        return bool(start and owner.start and start != owner.start)  # PID reused by a later process
    return lease_expired(held, now)


def lease_expired(held: Path, now: float | None = None) -> bool:
    """`held` has not been refreshed for `LEASE_S` seconds (or is gone)."""
    try:
        age = (time.time() if now is None else now) - held.stat().st_mtime
    except FileNotFoundError:
        return True
    return age > LEASE_S


class Heartbeat:
    """Refreshes the modification time of every held path each `HEARTBEAT_S` seconds, from one daemon thread."""

    def __init__(self) -> None:
        self._held: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    @contextlib.contextmanager
    def holding(self, path: Path):
        """Keep `path` fresh for the duration of the block (it need not exist yet)."""
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's thread and paths are not ours
                self._held, self._thread, self._pid = {}, None, os.getpid()
            self._held[path] = self._held.get(path, 0) + 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="t5hooks-heartbeat", daemon=True)
                self._thread.start()
        try:
            yield path
        finally:
            with self._lock:
                self._held[path] -= 1
                if not self._held[path]:
                    del self._held[path]

    def beat(self) -> None:
        with self._lock:
            paths = list(self._held)
        for path in paths:
            with contextlib.suppress(OSError):  # not created yet, or already gone: nothing to keep fresh
                os.utime(path)

    def _run(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            self.beat()


HEARTBEAT = Heartbeat()
