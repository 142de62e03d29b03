"""ExtractConfig: every setting of one extraction, checked once; the manifest records the part that shapes the store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

BACKENDS = ("auto", "eager", "compile", "onnx")
FORMATS = ("native", "saelens")


@dataclass(frozen=True)
class ExtractConfig:
    """How `extract` reads, batches, runs and stores a corpus (see `extract` for the meaning of each field).

    `manifest_settings()` is what a store records and a resumed run must match; `backend`, `max_batch`,
    `truncate`, `skip_empty` and `progress` change how the run goes, not what it stores, so a killed run may
    resume with other values.
    """

    format: str = "native"  # "native" | "saelens" (also packs SAELens's cached-activations dataset)
    context_size: int | None = None  # tokens per packed row (format="saelens")
    dtype: torch.dtype | str | None = None  # storage dtype; None: the model's
    field: str = "text"  # JSONL / dataset field of the prompt
    decoder_field: str | None = None  # field of teacher-forced decoder targets
    split: str = "train"
    streaming: bool = False
    max_tokens: int = 512  # longest prompt (and decoder target) in tokens
    truncate: bool = False  # cut longer prompts instead of failing
    skip_empty: bool = False  # skip empty prompts instead of failing
    token_budget: int = 8192  # padded tokens per batch
    max_batch: int | None = None  # prompts per batch at most
    window: int = 1024  # look-ahead window = prompts per shard (per rank); the unit of resumption
    backend: str = "auto"  # "auto" (eager; compiled once it pays, compile_policy) | "eager" | "compile" | "onnx"
    progress: bool = True  # a progress bar

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}; valid: {', '.join(FORMATS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}; valid: {', '.join(BACKENDS)}")
        if self.format == "saelens" and (self.context_size is None or self.context_size < 1):
            raise ValueError("format='saelens' needs context_size (tokens per packed row, e.g. 128)")
        for label in ("window", "token_budget", "max_tokens"):
            value = getattr(self, label)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if self.max_batch is not None and (not isinstance(self.max_batch, int) or self.max_batch < 1):
            raise ValueError(f"max_batch must be a positive integer or None, got {self.max_batch!r}")

    def manifest_settings(self, storage: str, world_size: int) -> dict[str, Any]:
        """The settings a store records (with the resolved storage dtype and the world size it was written by).

        truncate / skip_empty are not recorded: a finished window never held an over-long or empty prompt that
        they would treat differently, so a run stopped by one may continue with them."""
        return {
            "tokenization": {"max_tokens": self.max_tokens},
            "dtype": storage,
            "window": self.window,
            "world_size": world_size,
            **({"saelens_context_size": self.context_size} if self.format == "saelens" else {}),
        }
