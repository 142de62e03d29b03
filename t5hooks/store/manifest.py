"""A store's bookkeeping: create it or check it against the run (manifest.json), and each rank's progress file
(the completed windows), with what a killed run of the rank left half-written cleaned away."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..atomic import remove_stale_temps
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    describe_difference,
    progress_name,
    read_json,
    shard_name,
    write_json,
)

MANIFEST_WAIT_S = 600.0  # how long ranks > 0 wait for rank 0 to create the store (it loads and probes first)


def open_store(store_dir: Path, root: Path, config: dict[str, Any], format: str, rank: int) -> None:
    """Create the store, or check that the existing one was made by the same model / hooks / source / settings.
    Only rank 0 creates it (and cleans its stale temp files); the other ranks wait for its manifest."""
    manifest_path = store_dir / MANIFEST
    if rank != 0:
        wait_for(manifest_path, MANIFEST_WAIT_S)
    if manifest_path.exists():
        manifest = read_json(manifest_path)
        if manifest.get("format") != FORMAT_NAME:
            raise ValueError(f"{manifest_path} is not a t5hooks activation store manifest")
        diffs = describe_difference(manifest.get("config", {}), config)
        if diffs:
            raise ValueError(
                f"{store_dir} holds a store made with different settings; refusing to mix them "
                f"(use another out_dir, or delete this one):\n  " + "\n  ".join(diffs)
            )
        return
    for folder in {root, store_dir}:
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"out_dir {folder} exists and is not a directory")
        ours = lambda e: e.name.startswith((".", "progress-", "shard-")) or e.name in (MANIFEST, "native")
        foreign = [e.name for e in folder.iterdir() if not ours(e)] if folder.is_dir() else []
        if foreign:
            raise ValueError(
                f"out_dir {folder} is not empty and holds no t5hooks store (found {sorted(foreign)[:5]}); "
                f"choose an empty or new directory"
            )
    store_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        manifest_path, {"format": FORMAT_NAME, "version": FORMAT_VERSION, "output_format": format, "config": config}
    )


def wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0 did not create {path} within {timeout_s:.0f} s (see rank 0's error)")
        time.sleep(0.05)


def check_windows(windows: list[dict[str, Any]], path: Path) -> None:
    for i, record in enumerate(windows):
        if record.get("window") != i:
            raise ValueError(f"{path}: window records are not contiguous from 0 (entry {i} is {record.get('window')})")


def load_progress(store_dir: Path, rank: int, world_size: int) -> tuple[Path, dict[str, Any]]:
    """This rank's progress file and state (the completed windows). What a killed run of the rank may have left
    half-written is removed: the next shard, the progress file, and for rank 0 the manifest."""
    progress_path = store_dir / progress_name(rank, world_size)
    state = read_json(progress_path) if progress_path.exists() else {"rank": rank, "world_size": world_size}
    state.setdefault("windows", [])
    check_windows(state["windows"], progress_path)
    for final in [store_dir / shard_name(rank, len(state["windows"])), progress_path]:
        remove_stale_temps(final)
    if rank == 0:
        remove_stale_temps(store_dir / MANIFEST)
    return progress_path, state
