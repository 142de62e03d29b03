"""Models that ship with the package, loadable offline by name with `HookedEncoderDecoder.from_pretrained`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import HookedT5Config
from .tokenizer import ByteTokenizer

RANDOM_TINY = "t5hooks-tiny-random"
TRAINED_TINY = "t5hooks-tiny"
DEFAULT_MODEL = TRAINED_TINY  # what `t5hooks run` loads when no model is named
ASSETS = Path(__file__).resolve().parent / "assets"


def tiny_config(**overrides: Any) -> HookedT5Config:
    """The architecture of the embedded models (t5hooks-tiny, and t5hooks-tiny-random with seeded random
    weights): byte-level, 2+2 layers, d_model 128, gated GELU, untied unembedding, 64 position buckets (so
    every distance in a training string has its own bucket). The shipped weights carry their own copy of it."""
    values = dict(
        d_model=128,
        d_head=32,
        n_heads=4,
        d_mlp=256,
        n_layers=2,
        n_decoder_layers=2,
        d_vocab=ByteTokenizer.vocab_size,
        act_fn="gelu_new",
        gated_mlp=True,
        relative_attention_num_buckets=64,
        relative_attention_max_distance=64,
        tie_word_embeddings=False,
        scale_logits=False,
        seed=0,
        model_name=TRAINED_TINY,
    )
    values.update(overrides)
    return HookedT5Config(**values)


BUILTIN_MODELS = {
    TRAINED_TINY: "tiny byte-level T5 trained to reverse lowercase strings (t5hooks train-tiny), shipped with the package",
    RANDOM_TINY: "tiny byte-level T5 with seeded RANDOM weights (untrained: its outputs are meaningless)",
}


def describe(name: str) -> str:
    """One line on what a model is (built-in models say whether their weights are trained)."""
    return BUILTIN_MODELS.get(name, "loaded checkpoint")


def is_builtin(name: str) -> bool:
    return name in BUILTIN_MODELS


def load_builtin(
    model_cls: type,
    name: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
):
    if name == TRAINED_TINY:
        return load_tiny(model_cls, ASSETS / "t5hooks-tiny.safetensors", device=device, dtype=dtype, **overrides)
    if name == RANDOM_TINY:
        cfg = tiny_config(model_name=name, dtype=dtype, device=None if device is None else str(device), **overrides)
        return model_cls(cfg, tokenizer=ByteTokenizer())
    raise ValueError(f"unknown built-in model {name!r}; built in: {', '.join(BUILTIN_MODELS)}")


def save_tiny(model, path: str | Path, info: dict, *, overwrite: bool = True) -> Path:
    """Weights as safetensors with the config and training facts in the metadata, written atomically and
    read back (config and every tensor) before taking the final name."""
    from .atomic import atomic_path

    path = Path(path)
    cfg = model.cfg.to_dict()
    cfg.pop("device", None)
    metadata = {"config": json.dumps(cfg), "info": json.dumps(info)}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(state, str(tmp), metadata=metadata)
        back = load_file(str(tmp))
        if sorted(back) != sorted(state) or any(not torch.equal(back[k], v) for k, v in state.items()):
            raise RuntimeError(f"{path}: the written weights do not read back as written")
    return path


def load_tiny(model_cls, path: str | Path, device=None, dtype: torch.dtype = torch.float32, **overrides):
    from safetensors import safe_open

    from .loading import build_with_weights

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    cfg = HookedT5Config.from_dict(
        {**json.loads(meta["config"]), "dtype": dtype, "device": None if device is None else str(device), **overrides}
    )
    model = build_with_weights(model_cls, cfg, load_file(str(path)), ByteTokenizer(), what=str(path))
    model.info = json.loads(meta["info"])
    return model.eval()
