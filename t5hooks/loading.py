"""Load Hugging Face T5-family weights into a HookedEncoderDecoder or HookedT5Encoder.

Sources: a hub name (resolved through transformers' cache, so `HF_HUB_OFFLINE` applies), a local
directory written by `save_pretrained` (`subfolder=` for a diffusers pipeline's `text_encoder_2/`),
a single `.safetensors` (with `config.json` beside it) or `.gguf` file, or a live `transformers`
model. Files are read by the format readers in `t5hooks/weights/` (safetensors with fp32 / fp16 /
bf16 / fp8 weights, GGUF) or `torch.load(weights_only=True)` for `.bin`: nothing in a checkpoint
is ever executed. Loading streams: each tensor is read, dequantised and cast to the model's dtype
on its own, and the model is built on the meta device and the tensors assigned, not copied, so no
second full copy of the weights exists while loading. The checks of `checkpoint_checks.py` apply to every
source: a missing local path is never taken for a hub id, shard paths stay inside the checkpoint, pickles
that need code are refused, config values are typed and in range, weights are finite and the right shape.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .allocation import check_allocation
from .checkpoint_checks import (
    CheckpointError,
    check_hf_config,
    check_local_path,
    check_shapes,
    check_untied_head,
    confined_file,
    finite_checked,
    read_config_json,
    read_torch_pickle,
    shard_names_from_index,
    short_reason,
)
from .config import HookedT5Config
from .dtypes import AUTO, parse_dtype
from .user_warning import warn_user
from .weights.gguf_file import GGUFCheckpoint, is_gguf
from .weights.quantised import RowDequantiser, dequantised, plan_quantisation
from .weights.safetensors_file import SafetensorsFile, read_safetensors

SUPPORTED_MODEL_TYPES = ("t5", "mt5", "umt5")
HUB_KWARGS = ("cache_dir", "revision", "local_files_only", "token", "force_download")
ENCODER_ONLY_ARCHITECTURES = ("T5EncoderModel", "MT5EncoderModel", "UMT5EncoderModel")
# Checkpoints of these families overflow in fp16 (trained in bf16): gated-GELU MLPs (v1.1, Flan, mT5, UMT5).
FP16_RISKY_ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")
# Our size fields -> config.json's names (errors name the field the user can see).
HF_FIELD_NAMES = {
    "d_model": "d_model",
    "d_head": "d_kv",
    "n_heads": "num_heads",
    "d_mlp": "d_ff",
    "n_layers": "num_layers",
    "n_decoder_layers": "num_decoder_layers",
    "d_vocab": "vocab_size",
}
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


class EncoderOnlyCheckpoint(ValueError):
    """An encoder-only checkpoint given to a model with a decoder (the message names HookedT5Encoder)."""


@dataclass
class CheckpointSource:
    """Where weights come from: the transformers-style config, and a reader of `(HF name, tensor)` pairs."""

    what: str  # shown in errors
    config: dict[str, Any]
    read: Callable[[torch.dtype, Callable[[str], bool]], Iterator[tuple[str, Tensor]]]  # (dtype, wanted)
    stored_dtype: torch.dtype
    tied: bool | None = None  # known for a live model; else decided from the weights
    tokenizer_at: tuple[str, dict[str, Any]] | None = None  # (name or path, kwargs) for AutoTokenizer
    field_names: dict[str, str] = field(default_factory=lambda: dict(HF_FIELD_NAMES))  # ours -> the source's, in errors


def load_pretrained(
    model_cls: type,
    name_or_path: str,
    *,
    hf_model: Any = None,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    **kwargs: Any,
):
    """Build `model_cls` from a hub name, a local directory or file, or `hf_model` (see module docstring).

    Hub options (`cache_dir`, `revision`, `local_files_only`, `token`, `force_download`) go to
    transformers' `cached_file`; `subfolder` selects a model inside a repository or pipeline directory;
    `dtype="auto"` keeps the checkpoint's stored float dtype (fp8 and quantised GGUF weights: bfloat16);
    any other keyword overrides a `HookedT5Config` field (e.g. `attn_impl`).
    """
    hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    subfolder = kwargs.pop("subfolder", None)
    if hf_model is not None:
        source = live_source(hf_model, name_or_path)
    else:
        source = checkpoint_source(name_or_path, subfolder, hub_kwargs)
    hf_config = source.config
    _check_model_type(hf_config, source.what)
    check_hf_config(hf_config, source.what)
    _check_architecture(model_cls, hf_config, source.what)
    dtype = resolve_dtype(dtype, source.stored_dtype)
    try:  # sizes only (no tensors): the weights the config implies must fit before any is read
        sizes = HookedT5Config.from_hf_config(hf_config)
    except (TypeError, KeyError, AttributeError) as err:  # values of the wrong type that check_hf_config does not know
        raise CheckpointError(f"{source.what}: config.json cannot be used ({err})") from None
    has_decoder = not model_cls.discards("decoder.0.attn.q_proj")
    check_allocation(sizes, dtype, device, source.what, decoder=has_decoder, field_names=source.field_names)
    found_tokenizer = None  # looked for before the weights are read: a broken tokenizer file fails fast
    if tokenizer is None and hf_model is None and source.tokenizer_at is not None:
        found_tokenizer = load_tokenizer(*source.tokenizer_at)

    state, lm_head = read_state(model_cls, source, dtype, device)
    if "embed.W_E" not in state:
        raise ValueError(f"{source.what}: no token embedding (shared.weight) in the checkpoint")
    if not model_cls.discards("decoder.0.attn.q_proj") and not any(k.startswith("decoder.") for k in state):
        raise EncoderOnlyCheckpoint(
            f"{source.what}: the checkpoint has no decoder weights (an encoder-only model, e.g. a diffusion "
            f"pipeline's text encoder); load it with t5hooks.HookedT5Encoder.from_pretrained(...)"
        )
    tied = source.tied
    if tied is None:
        if not model_cls.discards("unembed.lm_head"):  # an encoder needs no head (UMT5 encoders say untied)
            check_untied_head(hf_config, lm_head, source.what)
        tied = lm_head is None or (
            lm_head.shape == state["embed.W_E"].shape and torch.equal(lm_head, state["embed.W_E"])
        )
    if not tied and not model_cls.discards("unembed.lm_head"):
        state["unembed.lm_head"] = lm_head

    cfg_values = dict(kwargs)
    cfg_values.setdefault("device", str(device) if device is not None else None)
    try:
        cfg = HookedT5Config.from_hf_config(
            hf_config, tie_word_embeddings=tied, dtype=dtype, model_name=name_or_path, **cfg_values
        )
    except (TypeError, KeyError, AttributeError) as err:  # values of the wrong type that check_hf_config does not know
        raise CheckpointError(f"{source.what}: config.json cannot be used ({err})") from None
    warn_if_fp16_overflows(cfg, source.what)
    model = build_with_weights(model_cls, cfg, state, tokenizer, what=source.what)
    if found_tokenizer is not None:
        model.tokenizer = found_tokenizer
    return model


def read_state(
    model_cls: type, source: CheckpointSource, dtype: torch.dtype, device: str | torch.device | None
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Stream the source's tensors into our names, each cast to `dtype` / `device` as soon as it is read
    (nothing is copied when it already is). Weights `model_cls` does not use are never read."""

    def ours(hf_name: str) -> str | None:
        name = convert_hf_name(hf_name)
        return None if name is not None and model_cls.discards(name) and name != "unembed.lm_head" else name

    def wanted(hf_name: str) -> bool:
        return ours(hf_name) is not None or hf_name.endswith("embed_tokens.weight")

    state: dict[str, Tensor] = {}
    lm_head = None
    for hf_name, tensor in finite_checked(source.read(dtype, wanted), source.what):  # NaN / inf: CheckpointError
        tensor = tensor.to(dtype=dtype, device=device)  # device None: stays where it is
        name = ours(hf_name)
        if name is None:
            if hf_name.endswith("embed_tokens.weight") and "embed.W_E" not in state:
                state["embed.W_E"] = tensor  # some exports carry only the per-stack copies
            continue
        if name == "unembed.lm_head":
            lm_head = tensor
            continue
        state[name] = tensor
    return state, lm_head


def build_with_weights(
    model_cls: type, cfg: HookedT5Config, state: dict[str, Tensor], tokenizer: Any = None, what: str = "checkpoint"
):
    """Build the model on the meta device and assign `state` (our names) as its parameters, cast to
    `cfg.dtype` / `cfg.device` (None: where they are): no random initialisation, and no second copy of
    weights already in the right dtype and place. Weights the model class does not use (an encoder-only
    model given a full checkpoint's decoder) are dropped."""
    with torch.device("meta"):
        model = model_cls(cfg, tokenizer=tokenizer, move_to_device=False)
    state = {
        k: v.to(dtype=cfg.dtype, device=cfg.device)  # device None: stay put
        for k, v in state.items()
        if not model_cls.discards(k)
    }
    expected_state = model.state_dict()
    expected = set(expected_state)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{what}: weights do not fit the config: missing {missing}, unexpected {unexpected}")
    check_shapes(expected_state, state, what)
    model.load_state_dict(state, assign=True)
    model.cfg.device = str(model.W_E.device)
    return model


def resolve_dtype(dtype: torch.dtype | str, stored: torch.dtype) -> torch.dtype:
    """`dtype` parsed (dtypes.py), with "auto" resolved to the checkpoint's stored dtype (fp8: bfloat16)."""
    dtype = parse_dtype(dtype, allow_auto=True)
    if dtype == AUTO:
        return stored if stored in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
    return dtype


def warn_if_fp16_overflows(cfg: HookedT5Config, what: str) -> None:
    """One warning when a gated-GELU T5 (v1.1, Flan, mT5, UMT5; trained in bf16) is loaded in fp16, where its
    activations overflow (the fp16 clamp after every residual add stays on, as in Hugging Face)."""
    if cfg.dtype == torch.float16 and cfg.gated_mlp and cfg.act_fn in FP16_RISKY_ACTIVATIONS:
        warn_user(
            f"{what}: T5 v1.1 / Flan-T5 / mT5 / UMT5 checkpoints overflow in float16 (they were trained in "
            f"bfloat16); load with dtype=torch.bfloat16 (or float32) for reliable activations",
        )


def _check_model_type(hf_config: dict[str, Any], name: str) -> None:
    model_type = hf_config.get("model_type", "t5")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{name} is a {model_type!r} model; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"(T5 v1.0, v1.1, Flan-T5, mT5, ByT5, UMT5)"
        )


def _check_architecture(model_cls: type, hf_config: dict[str, Any], name: str) -> None:
    architecture = (hf_config.get("architectures") or [""])[0]
    if architecture in ENCODER_ONLY_ARCHITECTURES and not model_cls.discards("decoder.0.attn.q_proj"):
        raise EncoderOnlyCheckpoint(
            f"{name} is an encoder-only checkpoint ({architecture}); load it with "
            f"t5hooks.HookedT5Encoder.from_pretrained(...), or use a full encoder-decoder checkpoint"
        )


# ---- sources -----------------------------------------------------------------------------------


def live_source(hf_model: Any, name: str) -> CheckpointSource:
    """A live transformers model: its own tensors (no copies when dtype and device match)."""
    hf_state = dict(hf_model.state_dict())
    shared = hf_model.get_input_embeddings().weight
    head = getattr(hf_model, "lm_head", None)
    tied = head is None or head.weight is shared or head.weight.data_ptr() == shared.data_ptr()
    if tied:
        hf_state.pop("lm_head.weight", None)

    def read(dtype: torch.dtype, wanted: Callable[[str], bool]) -> Iterator[tuple[str, Tensor]]:
        return ((k, v) for k, v in hf_state.items() if wanted(k))

    return CheckpointSource(repr(name), hf_model.config.to_dict(), read, shared.dtype, tied=tied)


def checkpoint_source(name_or_path: str, subfolder: str | None, hub_kwargs: dict[str, Any]) -> CheckpointSource:
    """A checkpoint on disk or on the hub: a directory, a `.safetensors` / `.gguf` file, or a hub name."""
    path = Path(name_or_path).expanduser() / (subfolder or "")
    if path.is_file():
        if is_gguf(path):
            return gguf_source(path)
        config_file = path.parent / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{str(path)!r}: a single weights file needs a config.json beside it")
        hf_config = read_config_json(config_file, repr(str(path)))
        return files_source(repr(str(path)), [path], hf_config, (str(path.parent), {}))
    files, hf_config, where = _resolve_checkpoint(name_or_path, subfolder, hub_kwargs)
    tokenizer_at = _tokenizer_location(name_or_path, subfolder, hub_kwargs)
    return files_source(where, files, hf_config, tokenizer_at)


def files_source(
    what: str, files: list[Path], hf_config: dict[str, Any], tokenizer_at: tuple[str, dict[str, Any]] | None
) -> CheckpointSource:
    """Safetensors or PyTorch-pickle weight files. Every header is checked, and how each non-float tensor is
    dequantised decided (`weights/quantised.py`: refused by name when unknown), before any weight is read."""
    method = (hf_config.get("quantization_config") or {}).get("quant_method")
    safetensors = [SafetensorsFile(f) for f in files if f.suffix == ".safetensors"]
    pickles = [f for f in files if f.suffix != ".safetensors"]  # pytorch_model.bin: weights_only, no code runs
    info: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    pickle_of: dict[str, Path] = {}
    for st in safetensors:
        info.update(st.info())
    for file in pickles:  # zip pickles are memory-mapped: reading the names and shapes reads no weights
        for name, tensor in read_torch_pickle(file).items():
            info[name], pickle_of[name] = (tensor.dtype, tuple(tensor.shape)), file
    plan = plan_quantisation(info, what, method)
    counts: dict[torch.dtype, int] = {}
    for name, (dt, shape) in info.items():
        if name not in plan.auxiliary:
            counts[dt] = counts.get(dt, 0) + math.prod(shape)
    # the dtype most weights are stored in (quantised ones: "auto" gives bfloat16)
    stored = max(counts, key=counts.__getitem__) if counts else torch.float32

    def read(dtype: torch.dtype, wanted: Callable[[str], bool]) -> Iterator[tuple[str, Tensor]]:
        if safetensors:
            yield from read_safetensors(safetensors, plan, dtype, wanted)
        for file in pickles:
            state = read_torch_pickle(file)

            def read_one(name: str, target: torch.dtype | None, dequantise: RowDequantiser | None) -> Tensor:
                t = state[name]  # noqa: B023 - used before the loop moves on
                if dequantise is None:
                    return t if target is None else t.to(target)
                rows = t.shape[0] if t.ndim else 1
                return dequantise(t.reshape(rows, -1), 0, rows, target or torch.float32).reshape(t.shape)

            def aux(name: str) -> Tensor:
                return state[name] if name in state else read_torch_pickle(pickle_of[name])[name]  # noqa: B023

            yield from dequantised(list(state), plan, dtype, wanted, read_one, lambda n: tuple(info[n][1]), aux)

    return CheckpointSource(what, hf_config, read, stored, tokenizer_at=tokenizer_at)


def gguf_source(path: Path) -> CheckpointSource:
    checkpoint = GGUFCheckpoint(path)

    def read(dtype: torch.dtype, wanted: Callable[[str], bool]) -> Iterator[tuple[str, Tensor]]:
        return checkpoint.tensors(dtype, wanted)

    return CheckpointSource(
        str(path), checkpoint.hf_config(), read, checkpoint.stored_dtype(), field_names=checkpoint.field_names()
    )


def _check_not_pipeline_root(path: Path) -> None:
    """A diffusers pipeline directory holds its text encoders in subfolders: say which to pick."""
    if (path / "model_index.json").is_file() and not (path / "config.json").is_file():
        t5_folders = sorted(
            sub.name
            for sub in path.iterdir()
            if (sub / "config.json").is_file()
            and read_config_json(sub / "config.json", repr(str(sub))).get("model_type") in SUPPORTED_MODEL_TYPES
        )
        raise FileNotFoundError(
            f"{str(path)!r} is a diffusers pipeline directory; pass subfolder= (CLI: --subfolder) one of {t5_folders} "
            f"(its T5-family text encoders)"
        )


def _resolve_checkpoint(
    name_or_path: str, subfolder: str | None, hub_kwargs: dict[str, Any]
) -> tuple[list[Path], dict[str, Any], str]:
    """Weight files, config dict and the name errors use, from a local directory or (through transformers'
    cache) the hub. A missing local path is FileNotFoundError, never looked up as a hub id."""
    base = check_local_path(name_or_path)  # None: a hub id
    if base is not None:
        path = base / (subfolder or "")
        if not path.is_dir():
            raise FileNotFoundError(f"{str(path)!r}: no such subfolder in {name_or_path!r}")
        _check_not_pipeline_root(path)
        where = repr(str(path))

        def local(filename: str) -> Path | None:
            candidate = confined_file(path, filename, where)
            return candidate if candidate.is_file() else None

        fetch = local
    else:
        from transformers.utils import cached_file

        extra = {"subfolder": subfolder} if subfolder else {}
        where = repr(name_or_path) + (f" (subfolder {subfolder!r})" if subfolder else "")

        def fetch(filename: str) -> Path | None:
            found = cached_file(
                name_or_path, filename, _raise_exceptions_for_missing_entries=False, **extra, **hub_kwargs
            )
            return Path(found) if found else None

    config_file = fetch("config.json")
    if config_file is None:
        raise FileNotFoundError(f"{where}: no config.json (expected a save_pretrained directory or hub name)")
    hf_config = read_config_json(config_file, where)
    _check_model_type(hf_config, where)  # before looking for weights: a BERT directory says so, not "no weights"
    for single, index in (("model.safetensors", SAFETENSORS_INDEX), ("pytorch_model.bin", BIN_INDEX)):
        file = fetch(single)
        if file is not None:
            return [file], hf_config, where
        index_file = fetch(index)
        if index_file is not None:
            shards = shard_names_from_index(index_file, where)  # relative names inside the checkpoint
            files = [fetch(shard) for shard in shards]
            if any(f is None for f in files):
                raise FileNotFoundError(f"{where}: a shard listed in {index} is missing")
            return files, hf_config, where  # type: ignore[return-value]
    raise FileNotFoundError(f"{where}: no model.safetensors or pytorch_model.bin (nor sharded index) found")


def _tokenizer_location(
    name_or_path: str, subfolder: str | None, hub_kwargs: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Where the tokenizer lives: beside the weights, or in a pipeline's `tokenizer_N/` for `text_encoder_N/`."""
    if not subfolder:
        return name_or_path, hub_kwargs
    sibling = re.sub(r"^text_encoder", "tokenizer", subfolder)
    base = Path(name_or_path)
    if base.is_dir():
        for candidate in (subfolder, sibling):
            if (base / candidate / "tokenizer_config.json").is_file():
                return str(base / candidate), {}
        return str(base / subfolder), {}
    return name_or_path, {**hub_kwargs, "subfolder": sibling}


# Files one of which every Hugging Face tokenizer directory has (fast, sentencepiece, BPE, byte-level).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "sentencepiece.bpe.model", "vocab.json")


def load_tokenizer(name_or_path: str, hub_kwargs: dict[str, Any]) -> Any:
    """The checkpoint's tokenizer when its files are there (never with remote code). No tokenizer files: None
    (rather than a tokenizer built from the model config alone, which maps every word to `<unk>`). Files that
    are there but do not load: CheckpointError with the reason, never a silent None."""
    path = Path(name_or_path)
    if path.is_dir():
        present = [f for f in TOKENIZER_FILES if (path / f).is_file()]
    else:
        from transformers.utils import cached_file

        present = []
        for f in TOKENIZER_FILES:
            try:
                if cached_file(name_or_path, f, _raise_exceptions_for_missing_entries=False, **hub_kwargs):
                    present.append(f)
            except OSError as err:  # offline and not cached, or the hub unreachable: say so, load without
                warn_user(
                    f"{name_or_path!r}: could not look for tokenizer files ({short_reason(err)}); the model is loaded "
                    f"without a tokenizer (pass tokenizer=... to give one)"
                )
                return None
    if not present:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False, **hub_kwargs)
    except Exception as err:  # transformers, tokenizers and sentencepiece raise many types for a broken file
        raise CheckpointError(
            f"{name_or_path!r}: its tokenizer files ({', '.join(present)}) could not be loaded: "
            f"{type(err).__name__}: {short_reason(err)} (repair or remove them, or pass tokenizer=...)"
        ) from err


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
