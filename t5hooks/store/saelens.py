"""SAELens export: the cached-activations dataset that SAELens's `CacheActivationsRunner` writes.

A Hugging Face `datasets` dataset saved with `save_to_disk`, one row per packed sequence: one
`Array2D(shape=(context_size, d_in), dtype)` column per hook and `token_ids`
(`Sequence(Value("int32"), length=context_size)`). SAELens trains on it with
`cached_activations_path=<out_dir>` (its `ActivationsStore` reads rows in order and reshapes them back to
`[rows * context_size, d_in]`). Rows are packed from real tokens only: the prompts' tokens (each ending with
its EOS) are concatenated in store order (rank, then window, then doc) and cut every `context_size` tokens;
the last incomplete sequence is dropped. The resumable native store stays in `<out_dir>/native`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from ..atomic import scratch_dir
from .format import index_key, read_shard, write_json
from .reader import ActivationStore

MARKER = "saelens.json"


def check_saelens_compatible(axes: dict[str, str], storage: str) -> None:
    if len(set(axes.values())) > 1:
        raise ValueError(
            "format='saelens' packs one token stream: choose only encoder hooks or only decoder hooks "
            f"(got {sorted(axes)} on both)"
        )
    if storage == "bfloat16":
        raise ValueError("format='saelens' writes Arrow, which has no bfloat16: use dtype float32 or float16")


def pack_when_complete(store_dir: Path, root: Path, context_size: int, rank: int, world_size: int) -> Path | None:
    """Rank 0 packs once every rank has finished (after a barrier when torch.distributed is initialised)."""
    import torch.distributed as dist

    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return None
    store = ActivationStore(store_dir)
    if not store.complete:
        print(f"t5hooks extract: not every rank has finished; run again to pack the SAELens dataset into {root}")
        return None
    marker = root / MARKER
    if marker.exists() and (root / "state.json").exists():
        return root  # packed by an earlier run of the same (manifest-checked) extraction
    write_saelens(store, root, context_size)
    return root


def write_saelens(store: ActivationStore, root: Path, context_size: int) -> dict[str, Any]:
    """Pack `store` into `root` as SAELens's cached-activations dataset; returns what the marker records."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    names = store.names
    axis = store.axis(names[0])
    dtype = store.config["dtype"]
    d_in = {name: math.prod(store.shape(name)) for name in names}
    features = datasets.Features(
        {
            **{name: datasets.Array2D(shape=(context_size, d_in[name]), dtype=dtype) for name in names},
            "token_ids": datasets.Sequence(datasets.Value("int32"), length=context_size),
        }
    )
    rows = dropped = 0
    with scratch_dir(root, "saelens-build") as build:  # a killed run's build folder is removed by the next
        writer = ArrowWriter(features=features, path=str(build / "packed.arrow"))
        carry: dict[str, torch.Tensor] = {}
        token_key = index_key(axis, "token_id")
        for shard in store.shards:
            tensors = read_shard(store.path / shard["file"], [*names, token_key])
            for key, value in tensors.items():  # [rows, *shape] -> [rows, d]
                value = value.reshape(len(value), -1)
                carry[key] = value if key not in carry else torch.cat([carry[key], value])
            n_seq = len(carry[token_key]) // context_size
            if n_seq:
                cut = n_seq * context_size
                batch = {name: carry[name][:cut].reshape(n_seq, context_size, -1).numpy() for name in names}
                batch["token_ids"] = carry[token_key][:cut].reshape(n_seq, context_size).numpy()
                writer.write_batch({k: list(v) for k, v in batch.items()})
                carry = {k: v[cut:] for k, v in carry.items()}
                rows += n_seq
        dropped = len(carry.get(token_key, ()))
        writer.finalize()
        writer.close()
        if rows == 0:
            raise ValueError(
                f"the store holds {dropped} tokens, fewer than one context of {context_size}: nothing to pack"
            )
        dataset = datasets.Dataset.from_file(str(build / "packed.arrow"))
        dataset.save_to_disk(str(build / "dataset"))
        del dataset
        files = sorted((build / "dataset").iterdir(), key=lambda p: p.name == "state.json")  # state.json last
        for f in files:
            os.replace(f, root / f.name)
    record = {"context_size": context_size, "rows": rows, "hooks": d_in, "dropped_tokens": dropped, "dtype": dtype}
    write_json(root / MARKER, record)
    return record
