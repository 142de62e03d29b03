"""Models that ship with the package, loadable offline by name with `HookedEncoderDecoder.from_pretrained`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import HookedT5Config
from .tokenizer import ByteTokenizer

RANDOM_TINY = "t5hooks-tiny-random"
TRAINED_TINY = "t5hooks-tiny"
DEFAULT_MODEL = TRAINED_TINY  # what `t5hooks run` loads when no model is named
ASSETS = Path(__file__).resolve().parent / "assets"


def tiny_config(**overrides: Any) -> HookedT5Config:
    """A small byte-level T5 v1.1-style architecture (gated GELU, untied unembedding)."""
    values = dict(
        d_model=128, d_head=32, n_heads=4, d_mlp=256, n_layers=2, n_decoder_layers=2,
        d_vocab=ByteTokenizer.vocab_size, act_fn="gelu_new", gated_mlp=True,
        relative_attention_num_buckets=32, relative_attention_max_distance=64,
        tie_word_embeddings=False, scale_logits=False, seed=0,
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


def load_builtin(model_cls: type, name: str, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, **overrides: Any):
    if name == TRAINED_TINY:
        from .train_tiny import load_tiny

        return load_tiny(model_cls, ASSETS / "t5hooks-tiny.safetensors", device=device, dtype=dtype, **overrides)
    if name == RANDOM_TINY:
        cfg = tiny_config(model_name=name, dtype=dtype, device=None if device is None else str(device), **overrides)
        return model_cls(cfg, tokenizer=ByteTokenizer())
    raise ValueError(f"unknown built-in model {name!r}; built in: {', '.join(BUILTIN_MODELS)}")
