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
from .quantised import QuantisationPlan, RowDequantiser, dequantised

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

    def info(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """`{name: (stored dtype, shape)}` in file order, from the header alone."""
        return {name: (self.entries[name].dtype, self.entries[name].shape) for name in self.names()}

    def read(
        self, name: str, f: BinaryIO, dtype: torch.dtype | None = None, dequantise: RowDequantiser | None = None
    ) -> Tensor:
        """One tensor, in `dtype` (default: as stored), through `dequantise` when given. Stored as it is wanted,
        it is read straight into its own buffer; otherwise it is read and converted in row blocks of about
        `CHUNK_ELEMENTS` values, so a conversion never holds a second full-size copy."""
        entry = self.entries[name]
        target = dtype or entry.dtype
        if target == entry.dtype and dequantise is None:
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
            if dequantise is not None:
                by_row[begin:end] = dequantise(chunk, begin, end, target)
            else:
                by_row[begin:end].copy_(chunk)  # converts in place: no full-size temporary
        return out

    def read_alone(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """One (small) tensor, opening the file for it."""
        with open(self.path, "rb") as f:
            return self.read(name, f, dtype)

    def _read_into(self, f: BinaryIO, entry: TensorEntry, offset: int, out: Tensor) -> None:
        f.seek(offset)
        wanted = out.numel() * out.element_size()
        got = f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
        if got != wanted:
            raise self.error(f"tensor {entry.name!r}: read {got} of {wanted} bytes (file truncated while reading?)")


def read_safetensors(
    files: list[SafetensorsFile],
    plan: QuantisationPlan,
    dtype: torch.dtype | None = None,
    wanted: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """`(weight name, tensor)` from the files of one checkpoint, in file order, as `plan` (made from all their
    headers, so a scale may sit in another shard than its weight) says: float tensors in `dtype` (None: as
    stored), quantised weights dequantised; auxiliary tensors not yielded, nor (unread) weights `wanted`
    rejects."""
    holder = {name: st for st in files for name in st.entries}

    def aux(name: str) -> Tensor:
        return holder[name].read_alone(name)

    for st in files:
        with open(st.path, "rb") as f:

            def read(name: str, target: torch.dtype | None, dequantise: RowDequantiser | None) -> Tensor:
                return st.read(name, f, target, dequantise)  # noqa: B023 - used before the loop moves on

            def shape_of(name: str) -> tuple[int, ...]:
                return st.entries[name].shape  # noqa: B023

            yield from dequantised(st.names(), plan, dtype, wanted, read, shape_of, aux)
