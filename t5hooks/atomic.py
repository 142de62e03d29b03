"""One write discipline for every file the project writes: temporary name beside the target, then rename.

A failed or interrupted write leaves the previous file intact and nothing under the final name:
`os.replace` within one directory is atomic on POSIX and Windows.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def temp_path_for(final: str | Path) -> Path:
    """A fresh temporary name in `final`'s directory (same filesystem, so the rename is atomic)."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(final: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it is renamed onto `final`, on an error removed.

    Verify inside the `with` block: an exception there keeps the previous `final` untouched.
    `overwrite=False` refuses (FileExistsError) when `final` already exists, before anything is written.
    """
    final = Path(final)
    if not overwrite and final.exists():
        raise FileExistsError(f"{final} already exists (pass overwrite=True / --force to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file for {final}")
        _fsync(tmp)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
