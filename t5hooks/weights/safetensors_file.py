"""Read safetensors files tensor by tensor, each straight into its own buffer.

Layout (the format's documented spec): 8 bytes little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the raw
little-endian data, offsets relative to its start. The header is checked against the file size
before any tensor is read, so a truncated download fails at once with the file's name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from . import CheckpointError
from .fp8 import FP8_DTYPES, check_scale, dequantise, is_auxiliary, scale_key

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 << 20  # the spec's limit on the JSON header
CHUNK_ELEMENTS = 1 << 18  # values read per block when a tensor is converted on the way in (1 MiB in fp32)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


class SafetensorsFile:
    """The parsed, validated header of one file; `read(name)` reads one tensor."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise self.error(f"only {size} bytes, too short for a safetensors header")
            n = int.from_bytes(raw, "little")
            if n > MAX_HEADER or n > size - 8:
                raise self.error(f"header claims {n} bytes but the file has {size} (truncated, or not safetensors)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise self.error(f"the header is not valid JSON ({err.__class__.__name__})") from None
        if not isinstance(header, dict):
            raise self.error("the header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        base = 8 + n
        self.entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self.error(f"tensor {name!r} has a malformed header entry {info!r}") from None
            expected = math.prod(shape) * dtype.itemsize
            if end - begin != expected:
                raise self.error(
                    f"tensor {name!r} spans {end - begin} bytes; {info['dtype']}{list(shape)} needs {expected}"
                )
            if base + end > size:
                raise self.error(
                    f"truncated: tensor {name!r} ends at byte {base + end} but the file has {size} bytes "
                    f"(an incomplete download or copy?)"
                )
            self.entries[name] = TensorEntry(name, dtype, shape, base + begin, base + end)

    def error(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a valid safetensors file: {what}")

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return sorted(self.entries, key=lambda k: self.entries[k].start)

    def elements_by_dtype(self) -> dict[torch.dtype, int]:
        """How many weight values each float dtype stores (scale and marker tensors not counted)."""
        counts: dict[torch.dtype, int] = {}
        for e in self.entries.values():
            if e.dtype.is_floating_point and not is_auxiliary(e.name):
                counts[e.dtype] = counts.get(e.dtype, 0) + math.prod(e.shape)
        return counts

    def read(self, name: str, f: BinaryIO, dtype: torch.dtype | None = None, scale: Tensor | None = None) -> Tensor:
        """One tensor, in `dtype` (default: as stored; fp8 multiplied by `scale` when given). Stored as it is
        wanted, it is read straight into its own buffer; otherwise it is read and converted in row blocks of
        about `CHUNK_ELEMENTS` values, so a conversion never holds a second full-size copy."""
        entry = self.entries[name]
        target = dtype or entry.dtype
        if target == entry.dtype and scale is None:
            out = torch.empty(entry.shape, dtype=entry.dtype)
            self._read_into(f, entry, entry.start, out)
            return out
        out = torch.empty(entry.shape, dtype=target)
        rows = entry.shape[0] if entry.shape else 1
        if rows == 0 or out.numel() == 0:
            return out
        by_row = out.reshape(rows, -1)  # a view: filling it fills `out`
        row_bytes = (entry.end - entry.start) // rows
        step = max(1, CHUNK_ELEMENTS // max(by_row.shape[1], 1))
        for begin in range(0, rows, step):
            end = min(rows, begin + step)
            chunk = torch.empty((end - begin, by_row.shape[1]), dtype=entry.dtype)
            self._read_into(f, entry, entry.start + begin * row_bytes, chunk)
            if entry.dtype in FP8_DTYPES:
                by_row[begin:end] = dequantise(chunk, _scale_rows(scale, begin, end), target)
            else:
                by_row[begin:end].copy_(chunk)  # converts in place: no full-size temporary
        return out

    def _read_into(self, f: BinaryIO, entry: TensorEntry, offset: int, out: Tensor) -> None:
        f.seek(offset)
        wanted = out.numel() * out.element_size()
        got = f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
        if got != wanted:
            raise self.error(f"tensor {entry.name!r}: read {got} of {wanted} bytes (file truncated while reading?)")

    def tensors(
        self, dtype: torch.dtype | None = None, wanted: Callable[[str], bool] | None = None
    ) -> Iterator[tuple[str, Tensor]]:
        """`(name, tensor)` in file order: float tensors in `dtype` (None: as stored, fp8 as float32), fp8
        weights multiplied by their scale when the file has one; integer tensors as stored. Scale and marker
        tensors are not yielded, nor (unread) tensors `wanted` rejects."""
        names = self.names()
        with open(self.path, "rb") as f:
            for name in names:
                if is_auxiliary(name) or (wanted is not None and not wanted(name)):
                    continue
                entry = self.entries[name]
                target = dtype if entry.dtype.is_floating_point else None
                scale = None
                if entry.dtype in FP8_DTYPES:
                    target = target or torch.float32
                    key = scale_key(name, names)
                    if key is not None:
                        scale = self.read(key, f, torch.float32)
                        check_scale(scale, entry.shape, f"{self.path}: {name}")
                yield name, self.read(name, f, target, scale)


def _scale_rows(scale: Tensor | None, begin: int, end: int) -> Tensor | None:
    """The part of a (scalar or per-row) scale that applies to rows `begin:end`."""
    if scale is None or scale.numel() == 1:
        return scale
    return scale.reshape(-1)[begin:end]
