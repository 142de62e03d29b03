"""Warm starts for `torch.compile`: what one process compiled, the next one loads instead of compiling.

After a compile, the artefacts inductor produced (FX graphs, AOTAutograd entries, dynamic-shape profiles,
autotuning results; `torch.compiler.save_cache_artifacts`) are written to one file per key; before the
first call of a later process with the same key they are loaded back (`load_cache_artifacts`), so Dynamo
only retraces and every graph is a cache hit: no inductor lowering, no C++ compiler.

A key is the model's configuration plus what was compiled (the capture set, the levers), under a directory
per torch version, Python version and machine (CPU model and flags, GPU name and capability): an entry is
never used by a different torch or machine. Beside each entry a small JSON record keeps the measured
compile times (cold, warm) and step times, which `compile_policy` uses to decide whether compiling pays.

Location: `$T5HOOKS_COMPILE_CACHE`, else `$XDG_CACHE_HOME/t5hooks/compile`, else `~/.cache/t5hooks/compile`.
Clear it with `t5hooks.compile_cache.clear()` or by deleting the directory. The entries hold compiled code
(the same kind inductor keeps under /tmp): treat the directory like any other of your own caches and do not
load one from someone else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path

ENV = "T5HOOKS_COMPILE_CACHE"
log = logging.getLogger(__name__)


def cache_root() -> Path:
    """The cache directory (see the module docstring); not created here."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "t5hooks" / "compile"


def machine_tag() -> str:
    """`torch-<version>-py<major.minor>-<arch>-<hash of CPU model, flags, GPU>`: one directory per build and
    machine, since compiled code is specific to both."""
    parts = [platform.machine(), _cpu_model_and_flags()]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        parts += [props.name, f"sm{props.major}{props.minor}", str(torch.version.cuda)]
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]
    return f"torch-{torch.__version__}-py{sys.version_info[0]}.{sys.version_info[1]}-{platform.machine()}-{digest}"


def _cpu_model_and_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = flags = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = " ".join(sorted(value.split()))
    return f"{model}|{flags}"


def key_digest(key: Mapping[str, Any]) -> str:
    """A stable digest of a JSON-able key (sorted, `repr` for anything JSON cannot hold)."""
    text = json.dumps(key, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class CompileCache:
    """One compiled function's entry: `load()` before its first call, `save()` after a call that compiled,
    `record(**measurements)` to keep times beside it. `key` identifies what is compiled (JSON-able)."""

    def __init__(self, key: Mapping[str, Any], root: str | Path | None = None) -> None:
        self.key = dict(key)
        self.directory = Path(root) if root is not None else cache_root() / machine_tag()
        digest = key_digest(self.key)
        self.artifacts = self.directory / f"{digest}.bin"
        self.record_path = self.directory / f"{digest}.json"

    def exists(self) -> bool:
        return self.artifacts.is_file()

    def load(self) -> bool:
        """Load the saved artefacts into inductor's caches; False when there are none (or they do not load,
        which is logged: the compile then runs cold and `save` replaces the entry)."""
        if not self.exists():
            return False
        try:
            info = torch.compiler.load_cache_artifacts(self.artifacts.read_bytes())
        except Exception as err:  # noqa: BLE001 - a stale or damaged entry must never stop the run
            log.warning("t5hooks: ignoring compile cache entry %s (%s)", self.artifacts, err)
            return False
        return info is not None

    def save(self) -> bool:
        """Write everything this process compiled so far (`save_cache_artifacts`), atomically. False when
        there is nothing to save."""
        result = torch.compiler.save_cache_artifacts()
        if result is None:
            return False
        with atomic_path(self.artifacts) as tmp:
            tmp.write_bytes(result[0])
        return True

    def measurements(self) -> dict[str, Any]:
        """The record kept beside the entry (empty when none)."""
        try:
            return dict(json.loads(self.record_path.read_text()).get("measured", {}))
        except (OSError, ValueError, AttributeError):
            return {}

    def record(self, **measured: Any) -> None:
        """Merge measurements (seconds, ratios) into the record beside the entry."""
        merged = {**self.measurements(), **measured}
        with atomic_path(self.record_path) as tmp:
            tmp.write_text(json.dumps({"key": self.key, "measured": merged}, indent=1, sort_keys=True, default=repr))


def clear(root: str | Path | None = None) -> int:
    """Delete the compile cache (all torch versions and machines); returns the number of files removed."""
    root = Path(root) if root is not None else cache_root()
    if not root.exists():
        return 0
    count = sum(1 for p in root.rglob("*") if p.is_file())
    shutil.rmtree(root)
    return count
