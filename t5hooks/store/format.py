"""The on-disk activation store: safetensors shards plus JSON bookkeeping, every file written atomically.

Layout of a store directory::

    manifest.json                          what was extracted: model, hooks (axis, per-token shape), source,
                                           tokenisation, storage dtype, window size, world size
    progress-00000-of-00001.json           per rank: the completed windows (input ranges) and their shards
    shard-00000-000000.safetensors         per rank and window: one tensor per hook `[rows, *shape]` and the
                                           index columns `__index__.<axis>.doc|pos|token_id` `[rows]`

Why safetensors shards with a JSON manifest (and not Arrow): the activations are dense fixed-shape float
tensors, which safetensors stores as raw little-endian buffers read back zero-copy through mmap, per tensor
(one hook at a time, no parsing, bf16 included, which Arrow lacks); the core package already depends on it,
so a store needs no `datasets`/`pyarrow`; any language with a JSON parser reads the 8-byte-length header.
The JSON files keep the bookkeeping human-readable. Arrow is what SAELens consumes, so `format="saelens"`
writes that too (see saelens.py).

Rows: only real tokens, ordered by (doc, pos) within a shard. A hook's "axis" is the token stream its
second dimension runs over: "encoder" (encoder positions; cross-attention keys/values too) or "decoder".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .. import dtypes
from ..atomic import atomic_path
from ..dtypes import dtype_name, parse_dtype

FORMAT_NAME = "t5hooks-activation-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_PREFIX = "__index__."
INDEX_COLUMNS = ("doc", "pos", "token_id")
INDEX_DTYPES = {"doc": torch.int64, "pos": torch.int32, "token_id": torch.int32}  # stored and loaded as these
AXES = ("encoder", "decoder")
STORAGE_DTYPES = {dtype_name(d): d for d in dtypes.STORAGE_DTYPES}  # name -> dtype


def storage_dtype_name(dtype: torch.dtype | str | None, default: torch.dtype) -> str:
    """'float32' | 'bfloat16' | 'float16' from a dtype or any name dtypes.py knows (fp32, bf16, fp16, ...);
    None: `default` (the model's dtype)."""
    return dtype_name(parse_dtype(dtype, allowed=STORAGE_DTYPES.values(), default=default, what="storage dtype"))


def index_key(axis: str, column: str) -> str:
    return f"{INDEX_PREFIX}{axis}.{column}"


def shard_name(rank: int, window: int) -> str:
    return f"shard-{rank:05d}-{window:06d}.safetensors"


def progress_name(rank: int, world_size: int) -> str:
    return f"progress-{rank:05d}-of-{world_size:05d}.json"


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """The model's config plus a hash of a strided sample of every parameter (cheap even for T5-XXL)."""
    cfg = model.cfg.to_dict() if hasattr(model.cfg, "to_dict") else dict(vars(model.cfg))
    for volatile in ("device", "attn_impl", "cpu_gemm", "dtype"):
        cfg.pop(volatile, None)
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)][:4096].to("cpu", torch.float64)
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(sample.numpy().tobytes())
    return {"class": type(model).__name__, "cfg": _jsonable(cfg), "weights_sample_sha256": h.hexdigest()}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    text = json.dumps(data, indent=1, sort_keys=False, ensure_ascii=False)
    with atomic_path(path, clean_stale=False) as tmp:  # the store cleans stale temps once, at start
        tmp.write_text(text + "\n", encoding="utf-8")
        json.loads(tmp.read_text(encoding="utf-8"))  # verify before the rename


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the store is damaged") from err


def describe_difference(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Human-readable paths where two manifest configs differ."""
    diffs = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += describe_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: store has {_short(a)}, this run has {_short(b)}")
    return diffs


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_shard(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> None:
    """One shard, atomically; verified (header readable, every tensor present) before the rename."""
    data = {name: t.contiguous() for name, t in tensors.items()}
    with atomic_path(path, clean_stale=False) as tmp:
        save_file(data, str(tmp), metadata={"t5hooks": json.dumps(metadata)})
        with safe_open(str(tmp), framework="pt") as f:
            missing = set(data) - set(f.keys())
        if missing:
            raise OSError(f"shard {path.name} was written without {sorted(missing)}")


def read_shard(path: Path, names: Iterable[str]) -> dict[str, Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in names}
