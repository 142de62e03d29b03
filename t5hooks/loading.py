"""Load Hugging Face T5-family weights into a HookedEncoderDecoder.

Three sources: a hub name (resolved through transformers' cache, so `HF_HUB_OFFLINE` applies),
a local directory written by `save_pretrained`, or a live `transformers` model. Checkpoint
files are read with safetensors, or `torch.load(weights_only=True)` for `.bin`: nothing in a
checkpoint directory is ever executed. The model is built on the meta device and the loaded
tensors are assigned, not copied, so no second full copy of the weights exists while loading.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import HookedT5Config

SUPPORTED_MODEL_TYPES = ("t5", "mt5", "umt5")
HUB_KWARGS = ("cache_dir", "revision", "local_files_only", "token", "force_download")
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

# Hugging Face parameter name (per layer) -> ours. `layer.0` is self-attention in both stacks; the decoder's
# `layer.1` is cross-attention, so its MLP sublayer is `layer.2` where the encoder's is `layer.1`.
_SELF_ATTENTION = {
    "layer.0.SelfAttention.q.weight": "attn.q_proj",
    "layer.0.SelfAttention.k.weight": "attn.k_proj",
    "layer.0.SelfAttention.v.weight": "attn.v_proj",
    "layer.0.SelfAttention.o.weight": "attn.o_proj",
    "layer.0.SelfAttention.relative_attention_bias.weight": "attn.rel_bias_table",
    "layer.0.layer_norm.weight": "ln1.w",
}


def _mlp_sublayer(index: int, norm: str) -> dict[str, str]:
    prefix = f"layer.{index}"
    return {
        f"{prefix}.DenseReluDense.wi.weight": "mlp.in_proj",
        f"{prefix}.DenseReluDense.wi_0.weight": "mlp.gate_proj",
        f"{prefix}.DenseReluDense.wi_1.weight": "mlp.in_proj",
        f"{prefix}.DenseReluDense.wo.weight": "mlp.out_proj",
        f"{prefix}.layer_norm.weight": f"{norm}.w",
    }


_ENCODER_LAYER = {**_SELF_ATTENTION, **_mlp_sublayer(1, "ln2")}
_DECODER_LAYER = {
    **_SELF_ATTENTION,
    "layer.1.EncDecAttention.q.weight": "cross_attn.q_proj",
    "layer.1.EncDecAttention.k.weight": "cross_attn.k_proj",
    "layer.1.EncDecAttention.v.weight": "cross_attn.v_proj",
    "layer.1.EncDecAttention.o.weight": "cross_attn.o_proj",
    "layer.1.layer_norm.weight": "ln2.w",
    **_mlp_sublayer(2, "ln3"),
}
_TOP_LEVEL = {
    "shared.weight": "embed.W_E",
    "encoder.final_layer_norm.weight": "encoder_final_ln.w",
    "decoder.final_layer_norm.weight": "decoder_final_ln.w",
    "lm_head.weight": "unembed.lm_head",
}
# Present in some checkpoints but unused by T5 (or duplicates of `shared.weight`).
_IGNORED = re.compile(
    r"^(encoder\.embed_tokens\.weight|decoder\.embed_tokens\.weight|"
    r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight)$"
)
_LAYER_KEY = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.(.+)$")


def convert_hf_name(name: str) -> str | None:
    """Our parameter name for a Hugging Face T5 parameter name (None if T5 does not use it)."""
    name = name.removeprefix("transformer.")
    if _IGNORED.match(name):
        return None
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    m = _LAYER_KEY.match(name)
    if m:
        stack, layer, rest = m.groups()
        table = _ENCODER_LAYER if stack == "encoder" else _DECODER_LAYER
        if rest in table:
            return f"{stack}.{layer}.{table[rest]}"
    raise ValueError(f"unexpected parameter {name!r} in a T5 checkpoint (is this a T5/mT5/UMT5/ByT5 model?)")


def load_pretrained(
    model_cls: type,
    name_or_path: str,
    *,
    hf_model: Any = None,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
):
    """Build `model_cls` from a hub name, a local directory, or `hf_model` (see module docstring).

    Hub options (`cache_dir`, `revision`, `local_files_only`, `token`, `force_download`) go to
    transformers' `cached_file`; any other keyword overrides a `HookedT5Config` field (e.g. `attn_impl`).
    """
    hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    cfg_overrides = kwargs
    if hf_model is not None:
        hf_config = hf_model.config.to_dict()
        hf_state = dict(hf_model.state_dict())
        shared = hf_model.get_input_embeddings().weight
        head = getattr(hf_model, "lm_head", None)
        tied = head is None or head.weight is shared or head.weight.data_ptr() == shared.data_ptr()
        if tied:
            hf_state.pop("lm_head.weight", None)
        tensors = iter(hf_state.items())
    else:
        files, hf_config = _resolve_checkpoint(name_or_path, hub_kwargs)
        tensors = _iter_checkpoint(files)
        tied = None  # decided from the weights below
    _check_model_type(hf_config, name_or_path)

    state: dict[str, Tensor] = {}
    lm_head = None
    for hf_name, tensor in tensors:
        ours = convert_hf_name(hf_name)
        if ours is None:
            if hf_name.endswith("embed_tokens.weight") and "embed.W_E" not in state:
                state["embed.W_E"] = tensor  # some exports carry only the per-stack copies
            continue
        if ours == "unembed.lm_head":
            lm_head = tensor
            continue
        state[ours] = tensor
    if "embed.W_E" not in state:
        raise ValueError(f"{name_or_path!r}: no token embedding (shared.weight) in the checkpoint")
    if tied is None:
        tied = lm_head is None or (
            lm_head.shape == state["embed.W_E"].shape and torch.equal(lm_head, state["embed.W_E"])
        )
    if not tied:
        state["unembed.lm_head"] = lm_head

    cfg_values = dict(cfg_overrides)
    cfg_values.setdefault("device", str(device) if device is not None else None)
    cfg = HookedT5Config.from_hf_config(
        hf_config, tie_word_embeddings=tied, dtype=dtype, model_name=name_or_path, **cfg_values
    )
    model = build_with_weights(model_cls, cfg, state, tokenizer, what=repr(name_or_path))
    if tokenizer is None and hf_model is None:
        model.tokenizer = _try_tokenizer(name_or_path, hub_kwargs)
    return model


def build_with_weights(
    model_cls: type, cfg: HookedT5Config, state: dict[str, Tensor], tokenizer: Any = None, what: str = "checkpoint"
):
    """Build the model on the meta device and assign `state` (our names) as its parameters, cast to
    `cfg.dtype` / `cfg.device` (None: where they are): no random initialisation, and no second copy of
    weights already in the right dtype and place."""
    with torch.device("meta"):
        model = model_cls(cfg, tokenizer=tokenizer, move_to_device=False)
    state = {k: v.to(dtype=cfg.dtype, device=cfg.device) for k, v in state.items()}  # device None: stay put
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{what}: weights do not fit the config: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(state, assign=True)
    model.cfg.device = str(model.W_E.device)
    return model


def _check_model_type(hf_config: dict[str, Any], name: str) -> None:
    model_type = hf_config.get("model_type", "t5")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{name!r} is a {model_type!r} model; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"(T5 v1.0, v1.1, Flan-T5, mT5, ByT5, UMT5)"
        )


def _resolve_checkpoint(name_or_path: str, hub_kwargs: dict[str, Any]) -> tuple[list[Path], dict[str, Any]]:
    """Weight files and config dict, from a local directory or (through transformers' cache) the hub."""
    path = Path(name_or_path)
    if path.is_dir():

        def local(filename: str) -> Path | None:
            candidate = path / filename
            return candidate if candidate.is_file() else None

        fetch = local
    else:
        from transformers.utils import cached_file

        def fetch(filename: str) -> Path | None:
            found = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
            return Path(found) if found else None

    config_file = fetch("config.json")
    if config_file is None:
        raise FileNotFoundError(f"{name_or_path!r}: no config.json (expected a save_pretrained directory or hub name)")
    hf_config = json.loads(config_file.read_text())
    for single, index in (("model.safetensors", SAFETENSORS_INDEX), ("pytorch_model.bin", BIN_INDEX)):
        file = fetch(single)
        if file is not None:
            return [file], hf_config
        index_file = fetch(index)
        if index_file is not None:
            shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
            files = [fetch(shard) for shard in shards]
            if any(f is None for f in files):
                raise FileNotFoundError(f"{name_or_path!r}: a shard listed in {index} is missing")
            return files, hf_config  # type: ignore[return-value]
    raise FileNotFoundError(f"{name_or_path!r}: no model.safetensors or pytorch_model.bin (nor sharded index) found")


def _iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, Tensor]]:
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()


def _try_tokenizer(name_or_path: str, hub_kwargs: dict[str, Any]) -> Any:
    """The checkpoint's tokenizer when one is there (never with remote code); None otherwise."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False, **hub_kwargs)
    except Exception:  # no tokenizer files: the model still works with token ids
        return None


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
