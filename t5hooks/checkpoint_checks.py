"""Checks applied while loading a checkpoint: every problem is one clear error naming the file or field.

Kept apart from `loading.py` (which decides *what* to read) so the checks apply to every source:
local paths are told apart from hub ids, shard paths stay inside the checkpoint, unreadable or
unsafe files say so (a pickle that needs arbitrary code is refused, never "retry unsafely"),
config values are typed and in range, and the weights are complete, finite and the right shape.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint (or its config / index) that cannot be loaded as it is."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint that only an unrestricted (code-executing) unpickler could read."""


# A hub id is `name` or `namespace/name` of letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".gguf", ".ckpt")


def looks_local(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether `name` is evidently meant as a local path rather than a hub id: absolute, `./` / `../` / `~`,
    a backslash, more than one `/`, not a valid hub id, ending in one of `suffixes`, or starting with a
    folder that exists here (`data/corpus` when `data/` is a local folder)."""
    first = name.split("/", 1)[0]
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or not _HUB_ID.match(name)
        or name.lower().endswith(suffixes)
        or ("/" in name and Path(first).is_dir())
    )


def check_local_path(name_or_path: str) -> Path | None:
    """The local directory `name_or_path` names, None for a hub id; FileNotFoundError / NotADirectoryError
    when it is evidently meant as a path (`looks_local`) but is not a directory, so a typo in a path is
    reported at once, never looked up (and retried) on the hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        raise NotADirectoryError(
            f"{name_or_path!r} is a file; pass the directory that holds config.json and the weights"
        )
    if looks_local(name_or_path, _CHECKPOINT_SUFFIXES):
        raise FileNotFoundError(f"no such directory: {name_or_path!r} (a local path; hub ids look like 'org/name')")
    return None


def shard_names_from_index(index_file: Path, label: str) -> list[str]:
    """The shard files a `*.index.json` lists, each a plain relative name inside the checkpoint
    (absolute paths and `..` are refused: an index cannot make the loader read other files)."""
    try:
        index = json.loads(Path(index_file).read_text())
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{label}: {Path(index_file).name} is not a valid shard index ({short_reason(err)})"
        ) from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{label}: {Path(index_file).name} has no 'weight_map' of parameter -> shard file")
    shards = sorted({str(v) for v in weight_map.values()})
    for shard in shards:
        confine_shard_name(shard, label)
    return shards


def confine_shard_name(shard: str, label: str) -> str:
    """`shard` if it is a relative path that stays inside the checkpoint directory; CheckpointError otherwise."""
    posix, windows = PurePosixPath(shard), PureWindowsPath(shard)
    if (
        not shard
        or posix.is_absolute()
        or windows.is_absolute()
        or windows.drive
        or ".." in posix.parts
        or ".." in windows.parts
    ):
        raise CheckpointError(
            f"{label}: the shard index names {shard!r}, outside the checkpoint directory; shard files must be "
            f"relative names inside it"
        )
    return shard


def confined_file(directory: Path, shard: str, label: str) -> Path:
    """`directory / shard`, checked to lie inside `directory` after resolving `..`."""
    confine_shard_name(shard, label)
    path = directory / shard
    if os.path.commonpath([os.path.abspath(directory), os.path.abspath(path)]) != os.path.abspath(directory):
        raise CheckpointError(f"{label}: shard {shard!r} resolves outside the checkpoint directory")
    return path


def read_config_json(config_file: Path, label: str) -> dict[str, Any]:
    try:
        config = json.loads(Path(config_file).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{label}: config.json is not valid JSON ({short_reason(err)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{label}: config.json holds a {type(config).__name__}, expected an object")
    return config


# config field -> (minimum, whether 0 is allowed)
_POSITIVE_INTS = ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size")
_OPTIONAL_INTS = ("num_decoder_layers", "relative_attention_num_buckets", "relative_attention_max_distance")
_TOKEN_IDS = ("pad_token_id", "eos_token_id", "decoder_start_token_id")


def check_hf_config(config: Mapping[str, Any], label: str) -> None:
    """Types and ranges of the T5 config fields we read: sizes are positive integers, token ids
    non-negative integers, `layer_norm_epsilon` a finite number > 0."""
    problems = []
    for key in (*_POSITIVE_INTS, *_OPTIONAL_INTS):
        value = config.get(key)
        if value is None and key in _OPTIONAL_INTS:
            continue
        if value is None:
            continue  # absent: the T5 default applies
        if not _is_int(value) or value < 1:
            problems.append(f"{key}={value!r} (must be an integer >= 1)")
    for key in _TOKEN_IDS:
        value = config.get(key)
        values = value if isinstance(value, list) else [value]
        if value is not None and not all(_is_int(v) and v >= 0 for v in values):
            problems.append(f"{key}={value!r} (must be an integer token id >= 0)")
    eps = config.get("layer_norm_epsilon")
    if eps is not None and (not _is_number(eps) or not math.isfinite(eps) or eps <= 0):
        problems.append(f"layer_norm_epsilon={eps!r} (must be a finite number > 0)")
    ff = config.get("feed_forward_proj")
    if ff is not None and not isinstance(ff, str):
        problems.append(f"feed_forward_proj={ff!r} (must be a string such as 'relu' or 'gated-gelu')")
    if problems:
        raise CheckpointError(f"{label}: config.json has invalid values: {'; '.join(problems)}")


def check_untied_head(config: Mapping[str, Any], lm_head: Tensor | None, label: str) -> None:
    """A config that declares untied embeddings must come with its `lm_head.weight`. (transformers would
    fill a missing head with random values and only warn; the predictions would be meaningless.)"""
    if lm_head is None and config.get("tie_word_embeddings", True) is False:
        raise CheckpointError(
            f"{label}: config.json says tie_word_embeddings=false but the checkpoint has no lm_head.weight "
            f"(transformers would initialise it randomly); add the head, or set tie_word_embeddings=true if the "
            f"model really shares its embedding"
        )


def finite_checked(tensors: Iterable[tuple[str, Tensor]], label: str) -> Iterator[tuple[str, Tensor]]:
    """Pass (name, tensor) pairs through; after the last, raise CheckpointError naming every tensor that holds
    NaN or inf (under the checkpoint's own names)."""
    bad = []
    for name, tensor in tensors:
        if tensor.is_floating_point() and tensor.device.type != "meta":
            count = _count_nonfinite(tensor)
            if count:
                bad.append(f"{name} ({count} of {tensor.numel()} values)")
        yield name, tensor
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(f"{label}: non-finite weights (NaN or inf) in {', '.join(bad[:5])}{more}")


_FINITE_CHUNK = 1 << 16  # elements checked at once: the scratch memory stays small (loading streams)


def _count_nonfinite(tensor: Tensor) -> int:
    """NaN and inf values in `tensor`, checked chunk by chunk (never a scratch copy of the whole tensor)."""
    count = 0
    for chunk in tensor.reshape(-1).split(_FINITE_CHUNK):
        if chunk.element_size() < 2:  # fp8 has no isfinite kernel
            chunk = chunk.float()
        finite = torch.isfinite(chunk)
        if not bool(finite.all()):
            count += int((~finite).sum())
    return count


def check_shapes(expected: Mapping[str, Any], state: Mapping[str, Tensor], label: str) -> None:
    """Each tensor has the shape the config implies (first mismatches named, on one line)."""
    wrong = [
        f"{name} {tuple(t.shape)} (expected {tuple(expected[name].shape)})"
        for name, t in state.items()
        if name in expected and tuple(t.shape) != tuple(expected[name].shape)
    ]
    if wrong:
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        raise CheckpointError(f"{label}: weights do not match the config's shapes: {', '.join(wrong[:5])}{more}")


def read_torch_pickle(file: Path) -> dict[str, Tensor]:
    """A `pytorch_model.bin` with `weights_only=True` (no code runs): zip files memory-mapped, old-format
    (pre-zip) files read whole. Anything that needs more than tensors is refused as unsafe."""
    mmap = zipfile.is_zipfile(file)
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the error below says what matters
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        needs_code = next((line for line in lines if "GLOBAL" in line), None)
        if needs_code is None:  # not code, just not a tensor pickle (junk, a raw pickle, a truncated file)
            detail = next((line for line in lines if "Unsupported" in line or "Invalid" in line), lines[-1])
            raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({detail})") from None
        raise UnsafeCheckpointError(
            f"{file} is not a safe checkpoint: {needs_code.rstrip('.')}. Loading it would run code from the file, "
            f"so it was not loaded; convert it to safetensors where you trust it (load it there, then "
            f"safetensors.torch.save_file(state_dict, 'model.safetensors'))"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({short_reason(err)})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: holds a {type(state).__name__}, expected a state dict of tensors")
    return dict(state)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def short_reason(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
