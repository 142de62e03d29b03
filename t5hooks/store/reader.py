"""ActivationStore: read an extracted store back, whole or as shuffled training batches."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .format import FORMAT_NAME, INDEX_COLUMNS, INDEX_DTYPES, MANIFEST, STORAGE_DTYPES, index_key, read_json, read_shard


class ActivationStore:
    """A store written by `t5hooks.store.extract` (or the `native/` folder beside a SAELens export).

    `store.names`, `store.shape(name)` (per-token shape), `store.num_rows(name)`, `store.load(name)` (every
    row with its doc / pos / token_id, sorted by (doc, pos)), and `store.batches(name, batch_size, seed)`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not (path / MANIFEST).exists() and (path / "native" / MANIFEST).exists():
            path = path / "native"  # the root of a format="saelens" extraction
        if not (path / MANIFEST).exists():
            raise FileNotFoundError(f"no activation store at {path} (no {MANIFEST}); create one with extract()")
        manifest = read_json(path / MANIFEST)
        if manifest.get("format") != FORMAT_NAME:
            raise ValueError(f"{path / MANIFEST} is not a t5hooks activation store manifest")
        self.path = path
        self.config: dict[str, Any] = manifest["config"]
        self.world_size: int = self.config["world_size"]
        self.shards: list[dict[str, Any]] = []  # completed windows, ordered by (rank, window)
        self.complete = True
        for rank in range(self.world_size):
            progress = path / f"progress-{rank:05d}-of-{self.world_size:05d}.json"
            state = read_json(progress) if progress.exists() else {"windows": []}
            self.complete &= bool(state.get("complete"))
            self.shards += [{**w, "rank": rank} for w in state["windows"]]

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return f"ActivationStore({str(self.path)!r}, {len(self.names)} hooks, {len(self.shards)} shards, {state})"

    @property
    def names(self) -> list[str]:
        return list(self.config["hooks"])

    @property
    def dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.config["dtype"]]

    def axis(self, name: str) -> str:
        """ "encoder" or "decoder": the token stream this hook's rows belong to."""
        return self._hook(name)["axis"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._hook(name)["shape"])

    def num_rows(self, name: str) -> int:
        axis = self.axis(name)
        return sum(s["rows"].get(axis, 0) for s in self.shards)

    def load(self, name: str) -> dict[str, Tensor]:
        """Every row of one hook: {"acts": [rows, *shape], "doc", "pos", "token_id": [rows]}, by (doc, pos).
        Reads the whole hook into memory: for inspection and tests; train with `batches`."""
        self._hook(name)
        axis = self.axis(name)
        parts: dict[str, list[Tensor]] = {"acts": [], **{c: [] for c in INDEX_COLUMNS}}
        for shard in self.shards:
            tensors = read_shard(self.path / shard["file"], [name, *(index_key(axis, c) for c in INDEX_COLUMNS)])
            parts["acts"].append(tensors[name])
            for c in INDEX_COLUMNS:
                parts[c].append(tensors[index_key(axis, c)])
        if not self.shards:  # the same dtypes as a store with rows
            acts = torch.zeros(0, *self.shape(name), dtype=self.dtype)
            return {"acts": acts, **{c: torch.zeros(0, dtype=d) for c, d in INDEX_DTYPES.items()}}
        out = {k: torch.cat(v) for k, v in parts.items()}
        if not len(out["doc"]):
            return out
        order = torch.argsort(out["doc"] * (int(out["pos"].max()) + 1) + out["pos"], stable=True)
        return {k: v[order] for k, v in out.items()}

    def iter_shards(self, name: str, *, source_tokens: bool = False) -> Iterator[dict[str, Any]]:
        """One hook's rows shard by shard, in store order: {"acts": [rows, *shape], "doc", "pos", "token_id":
        [rows]}, rows by (doc, pos) (a document never spans shards). With `source_tokens`, a decoder hook's
        shards also carry "source": the encoder tokens of the same documents ({"doc", "token_id"}), when the
        store holds encoder rows. Memory: one shard; for one streaming pass over a store."""
        self._hook(name)
        axis = self.axis(name)
        for shard in self.shards:
            keys = [name, *(index_key(axis, c) for c in INDEX_COLUMNS)]
            with_source = source_tokens and axis == "decoder" and "encoder" in shard["rows"]
            if with_source:
                keys += [index_key("encoder", "doc"), index_key("encoder", "token_id")]
            tensors = read_shard(self.path / shard["file"], keys)
            out: dict[str, Any] = {"acts": tensors[name], **{c: tensors[index_key(axis, c)] for c in INDEX_COLUMNS}}
            if with_source:
                out["source"] = {c: tensors[index_key("encoder", c)] for c in ("doc", "token_id")}
            yield out

    def batches(
        self,
        name: str,
        batch_size: int,
        seed: int = 0,
        *,
        buffer_rows: int = 1 << 18,
        epochs: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Iterator[Tensor]:
        """Shuffled `[batch_size, d]` activations of one hook (per-token shape flattened to `d`).

        Shards are visited in a seeded order, rows pass through a shuffle buffer of `buffer_rows` (memory is
        bounded by the buffer plus one shard), so the same seed gives the same batches. With DDP (`rank`,
        `world_size`, default from torch.distributed), shards are dealt to ranks round-robin after the seeded
        shuffle and every rank yields the same number of batches (the smallest rank's full batches), so
        ranks see disjoint rows and stay in step. Incomplete final batches are dropped.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._hook(name)
        rank, world_size = _ddp(rank, world_size)
        axis, d = self.axis(name), math.prod(self.shape(name))
        buffer_rows = max(buffer_rows, 2 * batch_size)
        for epoch in range(epochs):
            order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(seed + 1_000_003 * epoch))
            dealt = [[self.shards[i] for i in order[r::world_size].tolist()] for r in range(world_size)]
            if world_size > 1 and any(not shards for shards in dealt):
                raise ValueError(
                    f"{len(self.shards)} shards cannot be split over {world_size} ranks; extract with a smaller "
                    f"window (more shards) or train on fewer ranks"
                )
            per_rank = [sum(s["rows"].get(axis, 0) for s in shards) // batch_size for shards in dealt]
            limit = min(per_rank)
            gen = torch.Generator().manual_seed(seed * 7919 + epoch * 104_729 + rank)
            rows = self._shuffled_rows(name, dealt[rank], buffer_rows, batch_size, gen)
            for i, batch in enumerate(rows):
                if i >= limit:
                    break
                yield batch.reshape(batch_size, d).to(device=device, dtype=dtype or batch.dtype)

    def _shuffled_rows(
        self, name: str, shards: list[dict[str, Any]], buffer_rows: int, batch_size: int, gen: torch.Generator
    ) -> Iterator[Tensor]:
        buffer: Tensor | None = None
        for shard in shards:
            acts = read_shard(self.path / shard["file"], [name])[name]  # [rows, *shape]
            buffer = acts if buffer is None else torch.cat([buffer, acts])
            while len(buffer) >= buffer_rows:
                buffer = buffer[torch.randperm(len(buffer), generator=gen)]
                n_out = max(batch_size, (len(buffer) // 2) // batch_size * batch_size)  # keep half to mix with
                yield from buffer[:n_out].split(batch_size)
                buffer = buffer[n_out:]
        if buffer is not None and len(buffer) >= batch_size:
            buffer = buffer[torch.randperm(len(buffer), generator=gen)]
            n_out = len(buffer) // batch_size * batch_size
            yield from buffer[:n_out].split(batch_size)

    def _hook(self, name: str) -> dict[str, Any]:
        try:
            return self.config["hooks"][name]
        except KeyError:
            raise ValueError(f"this store has no hook {name!r}; it holds {self.names}") from None


def _ddp(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size
