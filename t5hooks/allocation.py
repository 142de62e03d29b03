"""Sizes checked against what they would allocate, before anything is allocated.

A config (a `config.json`, a GGUF header, a `HookedT5Config`) says how big every weight is. `check_allocation`
counts the weights it implies in exact integer arithmetic and refuses, naming the field responsible and the
bytes, a model larger than `MAX_MODEL_BYTES` or than the memory of the device it would live on (RAM, within a
cgroup limit, for the CPU; the GPU's memory for CUDA). Without it `num_layers=10**6` runs for minutes into a
MemoryError and `vocab_size=10**30` fails inside torch with a message that names nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

MAX_MODEL_BYTES = 1 << 40  # 1 TiB: ~20x the largest T5 ever released (umT5-XXL, 13B parameters, ~52 GB in fp32)
SIZE_FIELDS = ("d_model", "d_head", "n_heads", "d_mlp", "n_layers", "n_decoder_layers", "d_vocab")
# The largest value of each size among released T5-family models (t5-11b: d_ff 65536, 128 heads of 128; umT5:
# 256384 tokens; 48 layers): a field above it is named first when a config is too big to allocate.
LARGEST_RELEASED = {
    "d_model": 4096,
    "d_head": 128,
    "n_heads": 128,
    "d_mlp": 65536,
    "n_layers": 48,
    "n_decoder_layers": 48,
    "d_vocab": 256384,
}


def weight_count(cfg: Any, decoder: bool = True) -> int:
    """Parameters of a T5 with `cfg`'s sizes (a HookedT5Config or anything with its field names), exactly."""
    d, inner, mlp = cfg.d_model, cfg.n_heads * cfg.d_head, cfg.d_mlp * (2 if cfg.gated_mlp else 1)
    attention = 4 * d * inner  # q, k, v, o
    feed_forward = mlp * d + cfg.d_mlp * d  # wi (or wi_0 + wi_1), wo
    bias_table = cfg.relative_attention_num_buckets * cfg.n_heads
    enc_tables = cfg.n_layers if cfg.per_layer_position_bias else 1
    total = cfg.d_vocab * d + d  # embedding, final norm
    total += cfg.n_layers * (attention + feed_forward + 2 * d) + enc_tables * bias_table
    if decoder:
        dec_tables = cfg.n_decoder_layers if cfg.per_layer_position_bias else 1
        total += cfg.n_decoder_layers * (2 * attention + feed_forward + 3 * d) + dec_tables * bias_table + d
        if not cfg.tie_word_embeddings:
            total += cfg.d_vocab * d  # lm_head
    return total


def available_bytes(device: str | torch.device | None) -> int | None:
    """Memory a model on `device` can use: the CPU's RAM (or its cgroup limit, if lower), a CUDA device's
    memory; None where it cannot be told (meta, other accelerators)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory if torch.cuda.is_available() else None
    if device.type != "cpu":
        return None
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX: no limit known
        return None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            ram = min(ram, int(text))
    return ram


def check_allocation(
    cfg: Any,
    dtype: torch.dtype,
    device: str | torch.device | None,
    what: str,
    *,
    decoder: bool = True,
    field_names: Mapping[str, str] | None = None,
) -> None:
    """ValueError when the weights `cfg` implies (in `dtype`) exceed `MAX_MODEL_BYTES` or `device`'s memory,
    naming the field most responsible (under `field_names[field]`, e.g. config.json's names) and the bytes."""
    if torch.device(device or "cpu").type == "meta":
        return
    itemsize = torch.empty((), dtype=dtype).element_size()
    needed = weight_count(cfg, decoder) * itemsize
    memory = available_bytes(device)
    limit, where = MAX_MODEL_BYTES, f"the {_size(MAX_MODEL_BYTES)} sanity limit"
    if memory is not None and memory < limit:
        limit, where = memory, f"this machine's memory for {torch.device(device or 'cpu')} ({_size(memory)})"
    if needed <= limit:
        return
    # name the fields beyond any released T5 (largest excess first); if none is, all of them
    fields = [f for f in SIZE_FIELDS if f != "n_decoder_layers" or decoder]
    outliers = sorted((f for f in fields if getattr(cfg, f) > LARGEST_RELEASED[f]),
                      key=lambda f: getattr(cfg, f) // LARGEST_RELEASED[f], reverse=True)  # fmt: skip
    named = ", ".join(f"{(field_names or {}).get(f, f)}={getattr(cfg, f)}" for f in (outliers or fields))
    raise ValueError(
        f"{what}: {named} {'implies' if len(outliers) == 1 else 'imply'} {_size(needed)} of "
        f"{str(dtype).removeprefix('torch.')} weights, more than {where} (nothing was allocated)"
    )


def _size(n: int) -> str:
    if n.bit_length() > 1000:
        return f"about 2**{n.bit_length() - 1} bytes"
    if n >= 1 << 80:
        return f"{float(n):.3g} bytes"
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"
