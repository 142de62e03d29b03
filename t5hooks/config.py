"""HookedT5Config: the architecture of one T5-family model, and its conversion from a transformers T5Config."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .dtypes import dtype_name, parse_dtype

# T5 checkpoints name activations as in transformers' ACT2FN; these are the ones T5-family models use.
ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "silu", "swish")
ATTN_IMPLS = ("auto", "eager", "fused")
CPU_GEMMS = ("auto", "mkl", "onednn", "bf16")  # = kernels.cpu_gemm.SETTINGS (config sits below kernels)


@dataclass
class HookedT5Config:
    """Architecture of a T5 encoder-decoder (v1.0, v1.1/Flan, mT5, ByT5, UMT5), TransformerLens-style names.

    `tie_word_embeddings` decides whether the unembedding shares the embedding matrix;
    `scale_logits` whether the final residual is multiplied by `d_model**-0.5` before it
    (T5 v1.0 does both, v1.1/Flan/mT5/ByT5 neither). `per_layer_position_bias`: every
    self-attention layer owns its relative position bias table (UMT5) instead of all layers of a
    stack sharing layer 0's (T5).

    The fields in `RUN_OPTIONS` say how one copy of the model runs, not what the model is. A model
    keeps its own copy of the config it is built from, and `.to()` / `.half()` update that copy.
    """

    d_model: int = 512
    d_head: int = 64
    n_heads: int = 8
    d_mlp: int = 2048
    n_layers: int = 6  # encoder layers
    n_decoder_layers: int | None = None  # defaults to n_layers
    d_vocab: int = 32128
    act_fn: str = "relu"
    gated_mlp: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    per_layer_position_bias: bool = False
    layer_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    scale_logits: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # The length `to_tokens` (and text input) truncates to, as TransformerLens's n_ctx: HF's `n_positions`. None:
    # no truncation (T5's relative positions have no hard limit).
    n_ctx: int | None = None
    use_attn_result: bool = False
    # TransformerLens's input-hook switches (set_use_hook_mlp_in / set_use_attn_in / set_use_split_qkv_input).
    # hook_mlp_in is on by default here: without TransformerLens's clone it costs nothing.
    use_hook_mlp_in: bool = True
    use_attn_in: bool = False
    use_split_qkv_input: bool = False
    attn_impl: str = "auto"  # "auto" (fused on CUDA with Triton) | "eager" | "fused"
    # CPU GEMM backend of the linear layers in fp32 inference: "auto" (measured) | "mkl" | "onednn" | "bf16";
    # None: the environment variable T5HOOKS_CPU_GEMM, else auto (see kernels/cpu_gemm.py)
    cpu_gemm: str | None = None
    initializer_factor: float = 1.0
    seed: int | None = None
    dtype: torch.dtype = torch.float32
    device: str | None = None
    model_name: str = "custom"
    original_architecture: str = "T5ForConditionalGeneration"
    extra: dict[str, Any] = field(default_factory=dict)

    RUN_OPTIONS: ClassVar[tuple[str, ...]] = (
        "dtype",
        "device",
        "attn_impl",
        "cpu_gemm",
        "use_attn_result",
        "seed",
    )

    def __post_init__(self) -> None:
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        self.dtype = parse_dtype(self.dtype, what="HookedT5Config.dtype")
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field and what would be valid."""
        for name in ("d_model", "d_head", "n_heads", "d_mlp", "n_layers", "n_decoder_layers", "d_vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"HookedT5Config.{name} must be a positive int, got {value!r}")
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"HookedT5Config.act_fn={self.act_fn!r} is not supported; valid: {', '.join(ACTIVATIONS)}")
        if self.n_ctx is not None and (not isinstance(self.n_ctx, int) or self.n_ctx < 1):
            raise ValueError(f"HookedT5Config.n_ctx must be None or a positive int, got {self.n_ctx!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"HookedT5Config.attn_impl={self.attn_impl!r}; valid: {', '.join(ATTN_IMPLS)}")
        if self.cpu_gemm is not None and self.cpu_gemm not in CPU_GEMMS:
            raise ValueError(
                f"HookedT5Config.cpu_gemm={self.cpu_gemm!r}; valid: {', '.join(CPU_GEMMS)} "
                "(or None: the environment variable T5HOOKS_CPU_GEMM, else auto)"
            )
        nb, md = self.relative_attention_num_buckets, self.relative_attention_max_distance
        # The bidirectional half has nb//2 buckets, of which nb//4 are exact; the log-spaced rest needs room.
        if nb < 4 or md <= nb // 2:
            raise ValueError(
                f"relative_attention_num_buckets={nb} / max_distance={md}: need num_buckets >= 4 and "
                f"max_distance > num_buckets // 2"
            )

    def copy(self, **changes: Any) -> HookedT5Config:
        """An independent copy (`extra` included), with `changes` applied and validated."""
        return dataclasses.replace(self, **{"extra": copy.deepcopy(self.extra), **changes})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["dtype"] = dtype_name(self.dtype)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HookedT5Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown HookedT5Config fields {unknown}; valid fields: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_hf_config(cls, hf_config: Any, **overrides: Any) -> HookedT5Config:
        """Convert a transformers `T5Config` / `MT5Config` / `UMT5Config` (4.x or 5.x) or an equivalent dict.

        The logit scaling flag differs between versions: 5.x stores `scale_decoder_outputs`
        (and always reports `tie_word_embeddings=True`), 4.x uses `tie_word_embeddings` for both.
        Whether `lm_head` really shares the embedding is decided by the weights, at load time.
        """
        c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        ff = c.get("feed_forward_proj", "relu")
        parts = ff.split("-")
        gated = parts[0] == "gated"
        act = parts[-1]
        if ff == "gated-gelu":  # transformers maps this legacy name to the tanh approximation
            act = "gelu_new"
        if "scale_decoder_outputs" in c:
            scale = bool(c["scale_decoder_outputs"])
        else:
            scale = bool(c.get("tie_word_embeddings", True))
        n_layers = c.get("num_layers", 6)
        values = dict(
            d_model=c.get("d_model", 512),
            d_head=c.get("d_kv", 64),
            n_heads=c.get("num_heads", 8),
            d_mlp=c.get("d_ff", 2048),
            n_layers=n_layers,
            n_decoder_layers=c.get("num_decoder_layers") or n_layers,
            d_vocab=c.get("vocab_size", 32128),
            act_fn=act,
            gated_mlp=gated,
            relative_attention_num_buckets=c.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=c.get("relative_attention_max_distance", 128),
            per_layer_position_bias=c.get("model_type") == "umt5",
            layer_norm_eps=c.get("layer_norm_epsilon", 1e-6),
            tie_word_embeddings=scale,
            scale_logits=scale,
            pad_token_id=_first(c.get("pad_token_id"), 0),
            eos_token_id=_first(c.get("eos_token_id"), 1),
            decoder_start_token_id=_first(c.get("decoder_start_token_id"), _first(c.get("pad_token_id"), 0)),
            n_ctx=c.get("n_positions"),
            initializer_factor=c.get("initializer_factor", 1.0),
            model_name=c.get("_name_or_path") or c.get("name_or_path") or "custom",
            original_architecture=(
                c.get("architectures") or [DEFAULT_ARCHITECTURES.get(c.get("model_type"), "T5ForConditionalGeneration")]
            )[0],
        )
        values.update(overrides)
        return cls(**values)


# The architecture a config without `architectures` (built in code, not saved by a model) is taken to describe.
DEFAULT_ARCHITECTURES = {"mt5": "MT5ForConditionalGeneration", "umt5": "UMT5ForConditionalGeneration"}


def _first(value: Any, default: int) -> int:
    """Token ids may be stored as a list (several EOS ids); the model uses the first."""
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else default
    return int(value)
