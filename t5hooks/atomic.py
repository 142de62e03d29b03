"""One write discipline for every file the project writes: temporary name beside the target, then rename.

A failed or interrupted write leaves the previous file intact and nothing under the final name:
`os.replace` within one directory is atomic on POSIX and Windows. Temporary names are hidden
(`.name.tmp-<owner>-<random><suffix>`, keeping the suffix for writers that check it; `<owner>` as in
`ownership.py`: PID, process start time, machine); ones whose writer is provably dead (killed mid-write, on
this machine or, after its lease ran out, on another host sharing the filesystem) are removed by the next
write to the same target. Scratch folders (`scratch_dir`) follow the same rule.

A folder that one run writes over many steps (an activation store, a training `--out`) is held with
`exclusive_lock` for the run: a second writer gets a one-line `LockHeld` naming the holder; the lock of a
dead holder (same ownership rule) is taken over.

Multi-file artefacts (a directory of graphs) carry a manifest, written last: the model's fingerprint
and each file's size and SHA-256. Loaders call `verify_manifest`, so a directory whose files come from
two exports, or whose export was interrupted, is refused with a clear error instead of being used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .ownership import HEARTBEAT, LEASE_S, Owner, is_dead, lease_expired, me

MANIFEST = "t5hooks-manifest.json"
LOCK_NAME = ".t5hooks-lock"
_OWNER = r"\d+-\d+-[0-9a-f]{8}"
_TEMP = re.compile(rf"^\.(?P<stem>.*)\.tmp-(?P<owner>{_OWNER})-[0-9a-f]{{8}}(?P<suffix>.*)$")


class ArtefactError(ValueError):
    """A written artefact is incomplete, inconsistent or altered (its manifest does not match)."""


def temp_path_for(final: str | Path) -> Path:
    """A fresh hidden temporary name in `final`'s directory (same filesystem, so the rename is atomic),
    with `final`'s suffix: `model.onnx` -> `.model.tmp-<pid>-<start>-<machine>-<random>.onnx`."""
    final = Path(final)
    suffix = "".join(final.suffixes[-1:])
    stem = final.name[: len(final.name) - len(suffix)] if suffix else final.name
    return final.with_name(f".{stem}.tmp-{me().tag}-{uuid.uuid4().hex[:8]}{suffix}")


def check_writable(final: str | Path, *, overwrite: bool = True) -> Path:
    """Fail now, before any long work, if `final` could not be written: it exists and `overwrite` is False
    (FileExistsError), it is a directory (IsADirectoryError), a parent is a file (NotADirectoryError), or
    its directory does not accept new files (PermissionError). Missing parent directories are fine
    (they are created when writing). Probes by creating and removing a temporary file, so it is right
    for every user, root included."""
    final = Path(final)
    if final.is_dir():
        raise IsADirectoryError(f"{final} is a directory; give a file path")
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (pass --force / overwrite=True to replace it)")
    ancestor = final.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"cannot write {final}: {ancestor} is not a directory")
    probe = temp_path_for(ancestor / final.name)
    try:
        probe.touch(exist_ok=False)
    except OSError as err:
        raise PermissionError(f"cannot write {final}: directory {ancestor} does not accept new files ({err})") from None
    probe.unlink()
    return final


@contextlib.contextmanager
def atomic_path(final: str | Path, *, overwrite: bool = True, clean_stale: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it is renamed onto `final`, on an error removed.

    Verify inside the `with` block: an exception there keeps the previous `final` untouched.
    `overwrite=False` refuses (FileExistsError) when `final` already exists, before anything is written.
    `clean_stale` first removes temporary files a killed writer left for `final` (it lists the directory:
    writers of many files into one directory may pass False and call `remove_stale_temps` once).
    """
    final = Path(final)
    if not overwrite and final.exists():
        raise FileExistsError(f"{final} already exists (pass overwrite=True / --force to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    if clean_stale:
        remove_stale_temps(final)
    tmp = temp_path_for(final)
    try:
        with HEARTBEAT.holding(tmp):  # a long verification must not look abandoned to another host
            yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file for {final}")
        _fsync(tmp)
        _rename(tmp, final)
        _fsync_dir(final.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def save_torch(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)` through a memory buffer, so a failed write (a full disk, a file-size limit) raises
    the operating system's own error; torch's zip writer reports one as "unexpected pos ..." instead."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


def remove_stale_temps(final: str | Path) -> list[Path]:
    """Remove temporary files for `final` whose writers are provably dead (`ownership.is_dead`)."""
    final = Path(final)
    want = _TEMP.match(temp_path_for(final).name)
    assert want is not None
    removed = []
    if not final.parent.is_dir():
        return removed
    for candidate in final.parent.iterdir():
        m = _TEMP.match(candidate.name)
        if not m or m["stem"] != want["stem"] or m["suffix"] != want["suffix"]:
            continue
        owner = Owner.parse(m["owner"])
        if owner is None or owner == me() or not is_dead(owner, candidate):
            continue
        with contextlib.suppress(FileNotFoundError):
            candidate.unlink()
            removed.append(candidate)
    return removed


@contextlib.contextmanager
def scratch_dir(parent: str | Path, prefix: str) -> Iterator[Path]:
    """A fresh hidden folder `parent/.<prefix>-<owner>-<random>` for the block, removed after it; folders of
    the same prefix whose owners are provably dead (killed runs) are removed first."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"^\.{re.escape(prefix)}-(?P<owner>{_OWNER})-[0-9a-f]{{8}}$")
    for candidate in parent.iterdir():
        m = pattern.match(candidate.name)
        owner = Owner.parse(m["owner"]) if m else None
        if owner is not None and owner != me() and is_dead(owner, candidate):
            shutil.rmtree(candidate, ignore_errors=True)
    folder = parent / f".{prefix}-{me().tag}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        with HEARTBEAT.holding(folder):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- exclusive locks on folders ------------------------------------------------------------------


class LockHeld(RuntimeError):
    """Another live process holds the folder's lock (the message names it)."""


class LockLost(RuntimeError):
    """This process's lock was taken over (it looked dead to another writer: suspended past its lease?)."""


class FolderLock:
    """A held `exclusive_lock`: `check()` before a commit raises LockLost if the lock is no longer ours."""

    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path, self.record = path, record

    def check(self) -> None:
        holder = _read_lock(self.path)
        if holder is None or holder.get("owner") != self.record["owner"]:
            raise LockLost(
                f"{self.path.parent}: this run's lock was taken over by {_describe(holder)}; stopped before "
                f"writing more (was this process suspended for over {LEASE_S:.0f} s?)"
            )


@contextlib.contextmanager
def exclusive_lock(directory: str | Path, purpose: str, name: str = LOCK_NAME) -> Iterator[FolderLock]:
    """Hold `directory/<name>` for the block: one writer at a time. A live holder: LockHeld naming it (pid,
    host, since, command). A provably dead holder (`ownership.is_dead`: killed, or on another host and not
    refreshed for `LEASE_S`): its lock is taken over. The lock file records the holder and is refreshed by
    the heartbeat while held; it is removed on the way out."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    record = {
        "owner": me().tag,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "purpose": purpose,
        "command": " ".join(sys.argv)[:300],
    }
    _acquire(path, record)
    lock = FolderLock(path, record)
    try:
        with HEARTBEAT.holding(path):
            yield lock
    finally:
        holder = _read_lock(path)
        if holder is not None and holder.get("owner") == record["owner"]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _acquire(path: Path, record: dict[str, Any]) -> None:
    """Create `path` holding `record`, atomically and only if absent (a hard link of a complete temporary
    file, so a reader never sees half a record); take over a dead holder's lock; LockHeld otherwise."""
    tmp = temp_path_for(path)
    tmp.write_text(json.dumps(record) + "\n")
    try:
        for _ in range(5):
            try:
                _link_exclusive(tmp, path)
                return
            except FileExistsError:
                pass
            holder = _read_lock(path)
            if holder is None and not path.exists():
                continue  # released meanwhile: try again
            owner = Owner.parse(str((holder or {}).get("owner", "")))
            if owner is None:  # unreadable or foreign content: only its age can show it is abandoned
                if not lease_expired(path):
                    raise LockHeld(
                        f"{path.parent} is locked by {path} (unreadable); delete it if no run uses the folder"
                    )
            elif owner == me() or not is_dead(owner, path):
                if owner.machine == me().machine:
                    after = "a killed holder's lock is taken over at once"
                else:
                    after = f"a lock from another host expires {LEASE_S:.0f} s after its holder's last refresh"
                raise LockHeld(
                    f"{path.parent} is in use by {_describe(holder)}; wait for it to finish ({after}; or, if you "
                    f"are sure it is gone, delete {path})"
                )
            _take_over(path, holder)
        raise LockHeld(f"{path.parent}: could not take the lock {path} (other writers keep racing for it)")
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _link_exclusive(tmp: Path, path: Path) -> None:
    """`path` becomes `tmp`'s content if it does not exist (FileExistsError otherwise)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: exclusive create (a reader may briefly see it empty)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(tmp.read_text())


def _take_over(path: Path, dead: dict[str, Any] | None) -> None:
    """Remove a dead holder's lock without removing a live one a racing writer may have just created: move it
    aside, and if what was moved is not the dead record after all, put it back."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another writer took it over first
    moved = _read_lock(aside)
    if moved != dead:
        with contextlib.suppress(OSError):
            _link_exclusive(aside, path)  # fails only if a third writer locked meanwhile: it then holds it
    with contextlib.suppress(FileNotFoundError):
        aside.unlink()


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "another process"
    return (
        f"{holder.get('purpose', 'a t5hooks run')} (pid {holder.get('pid')} on {holder.get('host')}, since "
        f"{holder.get('since')}: {holder.get('command', '?')})"
    )


# ---- manifests for multi-file artefacts -------------------------------------------------------


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def begin_multi_file(directory: str | Path) -> Path:
    """Start (re)writing a multi-file artefact: creates `directory` and removes its manifest, so until
    `write_manifest` completes, loaders see it as incomplete rather than as the previous artefact."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (directory / MANIFEST).unlink()
    return directory


def write_manifest(directory: str | Path, files: Iterable[str], *, kind: str, fingerprint: str, **extra: Any) -> Path:
    """Write `directory/t5hooks-manifest.json` (atomically, last): artefact kind, model fingerprint, and
    the size and SHA-256 of each of `files` (names relative to `directory`)."""
    directory = Path(directory)
    entries = {}
    for name in files:
        path = directory / name
        entries[name] = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
    manifest = {"format": 1, "kind": kind, "fingerprint": fingerprint, "files": entries, **extra}
    with atomic_path(directory / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return directory / MANIFEST


def verify_manifest(directory: str | Path, *, kind: str, hashes: bool = True) -> dict[str, Any]:
    """Read and check `directory`'s manifest; returns it. Raises ArtefactError when the manifest is
    missing (an interrupted or foreign write), of another kind, or a listed file is missing, has another
    size, or (with `hashes`) another SHA-256 than when it was written."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtefactError(
            f"{directory}: no {MANIFEST}: the export that wrote this directory did not finish (or predates "
            f"manifests); export again"
        )
    try:
        manifest = json.loads(path.read_text())
        files = dict(manifest["files"])
        found_kind = manifest["kind"]
    except (ValueError, KeyError, TypeError) as err:
        raise ArtefactError(f"{path}: unreadable manifest ({err}); export again") from None
    if found_kind != kind:
        raise ArtefactError(f"{directory}: holds a {found_kind!r} artefact, expected {kind!r}")
    for name, entry in files.items():
        file = directory / name
        if not file.is_file():
            raise ArtefactError(f"{directory}: {name} is listed in {MANIFEST} but missing; export again")
        if file.stat().st_size != entry["bytes"] or (hashes and file_digest(file) != entry["sha256"]):
            raise ArtefactError(
                f"{directory}: {name} is not the file its manifest lists (changed after the export, or written "
                f"by another export into the same directory); export again"
            )
    return manifest


def state_fingerprint(module: Any) -> str:
    """A short fingerprint of a torch module's weights: names, shapes, dtypes and two checksums per tensor
    (computed where the tensors live, so it is cheap even for large models on GPU)."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            t = tensor.detach()
            if not t.is_floating_point() or t.element_size() < 2:  # ints, bools, fp8: small or unsupported sums
                t = t.float()
            checks = torch.stack([t.sum(dtype=torch.float64), torch.linalg.vector_norm(t, ord=2, dtype=torch.float64)])
            h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            h.update(checks.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


_rename = os.replace  # the commit point (tests replace it to kill a writer between its write and rename)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); directories cannot be opened for fsync on Windows."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
