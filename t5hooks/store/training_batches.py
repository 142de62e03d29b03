"""Training batches from an activation store: one seeded, bounded shuffle of the rows, several hooks row-aligned,
every rank reading only its share.

The shuffle runs on row *indices* `(shard, row)`: shards are visited in a seeded order, their indices pass
through a buffer of `buffer_rows` that is permuted and half emitted whenever it fills (memory: the index buffer
and one batch of activations, whatever the store's size). The resulting row stream depends on the seed, the
buffer and the store only, so it is the same on every rank and for every batch size. It is cut into global
batches of `batch_size * world_size` rows; rank r takes rows `[r * batch_size, (r + 1) * batch_size)` of each
(the DDP convention: `batch_size` is per rank), so N ranks see exactly the rows of one process run with
`batch_size * N`, in the same order. Rows are gathered from memory-mapped shards: a rank reads the pages of its
own rows, not whole shards.

Hooks of one token stream ("encoder" or "decoder") share the row stream, so their batches are row-aligned (row i
of every hook is the same token); hooks of the two streams get one stream each (seeded apart), and a pass ends
when the shorter runs out.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

# safetensors dtype names -> (numpy dtype to map the bytes, torch dtype to view them as)
_MAPPED = {
    "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16),
    "BF16": (np.uint16, torch.bfloat16),  # numpy has no bfloat16: map the bits, view them in torch
}


class StoreBatches:
    """Iterable of training batches: `[batch_size, d]` for one hook, `{hook: [batch_size, d]}` for a list.

    `len()` is the number of batches (all epochs); `skip(n)` continues after the first n without reading them
    (a resumed training run). See the module docstring for the order and the split by rank.
    """

    def __init__(
        self,
        store: Any,  # an ActivationStore
        hooks: str | Sequence[str],
        batch_size: int,
        seed: int = 0,
        *,
        buffer_rows: int = 1 << 18,
        epochs: int = 1,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if epochs < 1:
            raise ValueError(f"epochs must be positive, got {epochs}")
        if buffer_rows < 1:
            raise ValueError(f"buffer_rows must be positive, got {buffer_rows}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.single = isinstance(hooks, str)
        self.hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        if not self.hooks:
            raise ValueError("hooks is empty: name at least one of the store's hooks")
        if len(set(self.hooks)) != len(self.hooks):
            raise ValueError(f"hooks {self.hooks} repeat a name")
        self.store = store
        self.axes = {h: store.axis(h) for h in self.hooks}  # raises for an unknown hook
        self.widths = {h: math.prod(store.shape(h)) for h in self.hooks}
        self.batch_size, self.seed, self.buffer_rows, self.epochs = batch_size, seed, buffer_rows, epochs
        self.rank, self.world_size = rank, world_size
        self.dtype, self.device = dtype, device
        self._skip = 0
        self._maps: dict[tuple[str, str], np.ndarray] = {}
        self._headers: dict[str, dict[str, Any]] = {}

    def skip(self, n: int) -> StoreBatches:
        """The same batches from the n-th on (indices are advanced, no activation is read)."""
        other = StoreBatches.__new__(StoreBatches)
        other.__dict__.update(self.__dict__)
        other._skip, other._maps, other._headers = self._skip + n, {}, {}
        return other

    def batches_per_epoch(self) -> int:
        global_batch = self.batch_size * self.world_size
        return min(self.store.num_rows(h) for h in self.hooks) // global_batch

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() * self.epochs - self._skip)

    def __iter__(self) -> Iterator[Tensor | dict[str, Tensor]]:
        to_skip = self._skip
        for epoch in range(self.epochs):
            per_epoch = self.batches_per_epoch()
            if to_skip >= per_epoch:
                to_skip -= per_epoch
                continue
            streams = {axis: self._global_batches(axis, epoch) for axis in dict.fromkeys(self.axes.values())}
            for i in range(per_epoch):
                rows = {axis: next(stream) for axis, stream in streams.items()}  # [global batch, 2] (shard, row)
                if i < to_skip:
                    continue
                lo = self.rank * self.batch_size
                mine = {axis: r[lo : lo + self.batch_size] for axis, r in rows.items()}
                batch = {h: self._read(h, mine[self.axes[h]]) for h in self.hooks}
                yield batch[self.hooks[0]] if self.single else batch
            to_skip = 0

    # ---- the index stream -----------------------------------------------------------------------------
    def _global_batches(self, axis: str, epoch: int) -> Iterator[Tensor]:
        """`[batch_size * world_size, 2]` (shard, row) index batches of one token stream, in stream order."""
        size = self.batch_size * self.world_size
        pending = torch.zeros(0, 2, dtype=torch.long)
        for chunk in self._row_stream(axis, epoch):
            pending = torch.cat([pending, chunk])
            while len(pending) >= size:
                yield pending[:size]
                pending = pending[size:]

    def _row_stream(self, axis: str, epoch: int) -> Iterator[Tensor]:
        shards = self.store.shards
        axis_salt = 0 if axis == "encoder" else 7_368_787
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 104_729 + axis_salt)
        order = torch.randperm(len(shards), generator=gen).tolist()
        buffer = torch.zeros(0, 2, dtype=torch.long)
        for s in order:
            n = int(shards[s]["rows"].get(axis, 0))
            if n == 0:
                continue
            fresh = torch.stack([torch.full((n,), s, dtype=torch.long), torch.arange(n)], dim=1)
            buffer = torch.cat([buffer, fresh])
            while len(buffer) >= self.buffer_rows:
                buffer = buffer[torch.randperm(len(buffer), generator=gen)]
                half = max(1, len(buffer) // 2)  # keep half to mix with the next shards
                yield buffer[:half]
                buffer = buffer[half:]
        if len(buffer):
            yield buffer[torch.randperm(len(buffer), generator=gen)]

    # ---- reading rows ---------------------------------------------------------------------------------
    def _read(self, hook: str, index: Tensor) -> Tensor:
        """Rows `index [n, 2]` (shard, row) of `hook` as `[n, d]`, in that order."""
        out: Tensor | None = None
        for s in index[:, 0].unique().tolist():
            where = (index[:, 0] == s).nonzero().flatten()
            rows = self._mapped(s, hook)[index[where, 1].numpy()]  # reads only these rows' pages
            part = torch.from_numpy(np.ascontiguousarray(rows))
            _, torch_dtype = _MAPPED[self._dtype_name(s, hook)]
            part = part.view(torch_dtype).reshape(len(where), -1)
            if out is None:
                out = torch.empty(len(index), part.shape[1], dtype=part.dtype)
            out[where] = part
        assert out is not None
        return out.to(device=self.device, dtype=self.dtype or out.dtype)

    def _mapped(self, shard: int, hook: str) -> np.ndarray:
        file = self.store.shards[shard]["file"]
        key = (file, hook)
        if key not in self._maps:
            if len(self._maps) > 64:  # the shuffle window touches a few shards at a time
                self._maps.clear()
                self._headers.clear()
            self._maps[key] = _memmap_tensor(self.store.path / file, hook, self._header(file))
        return self._maps[key]

    def _header(self, file: str) -> dict[str, Any]:
        if file not in self._headers:
            self._headers[file] = _header(self.store.path / file)
        return self._headers[file]

    def _dtype_name(self, shard: int, hook: str) -> str:
        return self._header(self.store.shards[shard]["file"])[hook]["dtype"]


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header["__data_start__"] = 8 + size
    return header


def _memmap_tensor(path: Path, name: str, header: dict[str, Any]) -> np.ndarray:
    """A read-only memory map of one tensor of a safetensors file, as `[rows, prod(shape[1:])]`."""
    entry = header.get(name)
    if entry is None:
        raise ValueError(f"{path} holds no tensor {name!r}; the store is damaged")
    if entry["dtype"] not in _MAPPED:
        raise ValueError(f"{path}: {name} is stored as {entry['dtype']}; training batches read F32, F16 and BF16")
    np_dtype, _ = _MAPPED[entry["dtype"]]
    begin, end = entry["data_offsets"]
    shape = entry["shape"]
    rows, width = shape[0], math.prod(shape[1:])
    if rows == 0:
        return np.zeros((0, width), dtype=np_dtype)
    if (end - begin) != rows * width * np.dtype(np_dtype).itemsize:
        raise ValueError(f"{path}: {name} has {end - begin} bytes for shape {shape}; the store is damaged")
    return np.memmap(path, dtype=np_dtype, mode="r", offset=header["__data_start__"] + begin, shape=(rows, width))
