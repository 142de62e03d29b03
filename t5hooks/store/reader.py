"""ActivationStore: read an extracted store back, whole or as shuffled training batches."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .format import FORMAT_NAME, INDEX_COLUMNS, INDEX_DTYPES, MANIFEST, STORAGE_DTYPES, index_key, read_json, read_shard
from .training_batches import StoreBatches


class ActivationStore:
    """A store written by `t5hooks.store.extract` (or the `native/` folder beside a SAELens export).

    `store.names`, `store.shape(name)` (per-token shape), `store.num_rows(name)`, `store.load(name)` (every
    row with its doc / pos / token_id, sorted by (doc, pos)), and `store.batches(hooks, batch_size, seed)`.
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
        hooks: str | Sequence[str],
        batch_size: int,
        seed: int = 0,
        *,
        buffer_rows: int = 1 << 18,
        epochs: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> StoreBatches:
        """Shuffled training batches: `[batch_size, d]` for one hook name, `{hook: [batch_size, d]}` for a list
        (hooks of one token stream row-aligned; per-token shapes flattened to `d`), so one pass feeds every SAE.

        The same seed gives the same batches. Memory is bounded by a shuffle buffer of `buffer_rows` row
        indices plus one batch. Under torchrun (`rank`, `world_size`, default from torch.distributed)
        `batch_size` is per rank and each rank reads its slice of every global batch: N ranks together see
        exactly the rows, in order, of one process with `batch_size * N`. Incomplete final batches are dropped;
        `len()` counts the batches and `.skip(n)` resumes after n of them without reading them
        (see training_batches.py)."""
        rank, world_size = _ddp(rank, world_size)
        return StoreBatches(
            self, hooks, batch_size, seed, buffer_rows=buffer_rows, epochs=epochs, rank=rank,
            world_size=world_size, dtype=dtype, device=device,
        )  # fmt: skip

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
