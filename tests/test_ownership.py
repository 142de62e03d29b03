"""Ownership of temporary files, scratch folders and folder locks: removed or taken over only when the owner is
provably dead, which survives PID reuse and filesystems shared by several hosts.

PID reuse is simulated with a record naming a live PID (this test's parent process) but another start time;
a second host with a record whose machine hash is not ours (its PID is meaningless here), fresh or with a
modification time past the lease. Dead writers are real child processes that have exited or were SIGKILLed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from t5hooks.atomic import (
    LOCK_NAME,
    LockHeld,
    LockLost,
    atomic_path,
    exclusive_lock,
    remove_stale_temps,
    scratch_dir,
    temp_path_for,
)
from t5hooks.ownership import HEARTBEAT, LEASE_S, Owner, is_dead, me, process_start

ROOT = Path(__file__).resolve().parents[1]
OTHER_HOST = "0badf00d"


def exited_child() -> Owner:
    """The owner record of a real process that has exited (and been reaped)."""
    code = "import os; print(os.getpid(), open(f'/proc/{os.getpid()}/stat').read().rsplit(')', 1)[1].split()[19])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return Owner(int(out[0]), int(out[1]), me().machine)


def reused_pid() -> Owner:
    """A live PID (our parent) recorded with another start time: what a reused PID looks like."""
    parent = os.getppid()
    return Owner(parent, process_start(parent) + 12345, me().machine)


def age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_the_ownership_rule():
    assert me().start == process_start(os.getpid()) and me().start > 0
    held = Path(__file__)
    assert not is_dead(me(), held)
    assert not is_dead(Owner(os.getppid(), process_start(os.getppid()), me().machine), held)  # alive, same start
    assert is_dead(exited_child(), held)
    assert is_dead(reused_pid(), held)  # PID reused by a later process: the recorded one is gone


def test_stale_temps_pid_reuse_and_a_second_host(tmp_path):
    final = tmp_path / "model.pt2"
    tmp = temp_path_for(final)
    assert tmp.name.startswith(f".model.tmp-{me().tag}-") and tmp.suffix == ".pt2"

    def temp(owner: Owner, name: str = "model") -> Path:
        path = tmp_path / f".{name}.tmp-{owner.tag}-0123abcd.pt2"
        path.write_bytes(b"x")
        return path

    killed = temp(exited_child())
    reused = temp(reused_pid())
    parent = temp(Owner(os.getppid(), process_start(os.getppid()), me().machine))  # a live writer here
    elsewhere_fresh = temp(Owner(os.getpid(), 1, OTHER_HOST))  # same PID number, another host: alive there
    elsewhere_expired = temp(Owner(1, 1, OTHER_HOST))
    elsewhere_expired.rename(elsewhere_expired.with_name(elsewhere_expired.name.replace("0123abcd", "0123abce")))
    elsewhere_expired = elsewhere_expired.with_name(elsewhere_expired.name.replace("0123abcd", "0123abce"))
    age(elsewhere_expired, LEASE_S + 60)
    other_target = temp(exited_child(), name="other")
    mine = temp_path_for(final)
    mine.write_bytes(b"in progress")
    removed = remove_stale_temps(final)
    assert sorted(removed) == sorted([killed, reused, elsewhere_expired])
    assert parent.exists() and elsewhere_fresh.exists() and other_target.exists() and mine.exists()


def test_a_writer_refreshes_its_temp_file_while_it_writes(tmp_path):
    final = tmp_path / "out.bin"
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"slow verification")
        age(tmp, LEASE_S + 60)
        HEARTBEAT.beat()  # what the heartbeat thread does every HEARTBEAT_S seconds
        assert time.time() - tmp.stat().st_mtime < 60
    assert final.read_bytes() == b"slow verification"


def test_scratch_folders_of_dead_owners_are_removed(tmp_path):
    def folder(owner: Owner, rand: str) -> Path:
        path = tmp_path / f".saelens-build-{owner.tag}-{rand}"
        path.mkdir()
        (path / "packed.arrow").write_bytes(b"x")
        return path

    dead = folder(exited_child(), "00000001")
    reused = folder(reused_pid(), "00000002")
    fresh_elsewhere = folder(Owner(1, 1, OTHER_HOST), "00000003")
    old_elsewhere = folder(Owner(1, 1, OTHER_HOST), "00000004")
    age(old_elsewhere, LEASE_S + 60)
    with scratch_dir(tmp_path, "saelens-build") as build:
        assert build.is_dir() and build.name.startswith(f".saelens-build-{me().tag}-")
        assert not dead.exists() and not reused.exists() and not old_elsewhere.exists()
        assert fresh_elsewhere.exists()
    assert not build.exists()


# ---- locks ---------------------------------------------------------------------------------------------------

# Child processes import t5hooks.atomic alone (a bare package object instead of t5hooks/__init__, which imports
# torch): they start in a fraction of a second, so the race below really is a race.
BARE_IMPORT = f"""
import sys, types
package = types.ModuleType("t5hooks")
package.__path__ = [{str(ROOT / "t5hooks")!r}]
sys.modules["t5hooks"] = package
"""

HOLDER = BARE_IMPORT + textwrap.dedent(
    """
    import sys, time
    from t5hooks.atomic import exclusive_lock
    with exclusive_lock(sys.argv[1], "t5hooks extract (test holder)"):
        print("HELD", flush=True)
        time.sleep(120)
    """
)


def start_holder(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "HELD", proc.stderr.read()
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path):
    store = tmp_path / "acts"
    holder = start_holder(store)
    try:
        with pytest.raises(LockHeld) as err, exclusive_lock(store, "t5hooks extract"):
            pass
        message = str(err.value)
        assert "\n" not in message
        assert f"pid {holder.pid} on " in message and "t5hooks extract (test holder)" in message
        assert str(store) in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (store / LOCK_NAME).exists()  # a SIGKILLed holder cannot clean up
    with exclusive_lock(store, "second run") as lock:
        assert json.loads((store / LOCK_NAME).read_text())["pid"] == os.getpid()
        lock.check()
    assert not (store / LOCK_NAME).exists()


def write_lock(directory: Path, owner: Owner, host: str = "node-7") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    record = {"owner": owner.tag, "host": host, "pid": owner.pid, "since": "then", "purpose": "x", "command": "y"}
    path.write_text(json.dumps(record))
    return path


def test_lock_ownership_survives_pid_reuse_and_a_second_host(tmp_path):
    # PID reused: the record names a live PID that now belongs to a process started at another time
    write_lock(tmp_path / "a", reused_pid())
    with exclusive_lock(tmp_path / "a", "run"):
        pass
    # another host, refreshed recently: presumed alive (its PID means nothing here)
    write_lock(tmp_path / "b", Owner(os.getpid(), 1, OTHER_HOST))
    with pytest.raises(LockHeld, match=r"in use by x \(pid \d+ on node-7.*expires 300 s after"):
        with exclusive_lock(tmp_path / "b", "run"):
            pass
    # another host, not refreshed for longer than the lease: dead
    age(write_lock(tmp_path / "c", Owner(1, 1, OTHER_HOST)), LEASE_S + 60)
    with exclusive_lock(tmp_path / "c", "run"):
        pass
    # an unreadable lock file: held while fresh
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / LOCK_NAME).write_text("garbage")
    with pytest.raises(LockHeld, match="unreadable"), exclusive_lock(tmp_path / "d", "run"):
        pass


def test_a_lock_taken_over_is_noticed_before_the_next_commit(tmp_path):
    with exclusive_lock(tmp_path, "run") as lock:
        lock.check()
        write_lock(tmp_path, Owner(1, 1, OTHER_HOST))  # another writer decided we were dead
        with pytest.raises(LockLost, match="taken over by x"):
            lock.check()
    assert (tmp_path / LOCK_NAME).exists()  # not ours: left in place on the way out


RACER = BARE_IMPORT + textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from t5hooks.atomic import LockHeld, exclusive_lock
    folder, start, racers = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    time.sleep(max(0.0, start - time.time()))
    try:
        with exclusive_lock(folder, "racer"):
            print("WON", flush=True)
            deadline = time.time() + 60  # hold until every other racer has tried
            while len(list(folder.glob("tried-*"))) < racers - 1 and time.time() < deadline:
                time.sleep(0.05)
    except LockHeld:
        print("LOST", flush=True)
        (folder / f"tried-{os.getpid()}").touch()
    """
)


def test_writers_racing_for_a_dead_holders_lock_one_wins(tmp_path):
    age(write_lock(tmp_path, exited_child()), 0)
    start = time.time() + 1.5  # after every racer has started
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(tmp_path), str(start), "3"], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    results = sorted(p.communicate(timeout=60)[0].strip() for p in racers)
    assert results == ["LOST", "LOST", "WON"]
    assert not (tmp_path / LOCK_NAME).exists()
