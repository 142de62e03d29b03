"""One write discipline for every file the project writes: temporary name beside the target, then rename.

A failed or interrupted write leaves the previous file intact and nothing under the final name:
`os.replace` within one directory is atomic on POSIX and Windows. Temporary names are hidden
(`.name.tmp-<pid>-<random><suffix>`, keeping the suffix for writers that check it); ones left by a killed
process are removed by the next write to the same target.

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
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

MANIFEST = "t5hooks-manifest.json"
_TEMP = re.compile(r"^\.(?P<stem>.*)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}(?P<suffix>.*)$")


class ArtefactError(ValueError):
    """A written artefact is incomplete, inconsistent or altered (its manifest does not match)."""


def temp_path_for(final: str | Path) -> Path:
    """A fresh hidden temporary name in `final`'s directory (same filesystem, so the rename is atomic),
    with `final`'s suffix: `model.onnx` -> `.model.tmp-<pid>-<random>.onnx`."""
    final = Path(final)
    suffix = "".join(final.suffixes[-1:])
    stem = final.name[: len(final.name) - len(suffix)] if suffix else final.name
    return final.with_name(f".{stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


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
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file for {final}")
        _fsync(tmp)
        _rename(tmp, final)
        _fsync_dir(final.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def remove_stale_temps(final: str | Path) -> list[Path]:
    """Remove temporary files for `final` left by processes that no longer run (killed mid-write)."""
    final = Path(final)
    expected = temp_path_for(final)
    want = _TEMP.match(expected.name)
    assert want is not None
    removed = []
    if not final.parent.is_dir():
        return removed
    for candidate in final.parent.iterdir():
        m = _TEMP.match(candidate.name)
        if not m or m["stem"] != want["stem"] or m["suffix"] != want["suffix"] or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            candidate.unlink()
            removed.append(candidate)
    return removed


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


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would send CTRL_C: never probe
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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
