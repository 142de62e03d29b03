"""GGUF files (llama.cpp's format) of T5 models, read through the `gguf` package.

The package parses the header and metadata (`GGUFReader`), names the tensors (`get_tensor_name_map`,
the table llama.cpp's converter writes T5 with: `token_embd`, `enc.blk.{i}.attn_q`, `enc.blk.{i}.ffn_gate`,
`dec.blk.{i}.cross_attn_k`, `enc.output_norm`, `output` ...) and dequantises (`gguf.quants.dequantize`:
F32 / F16 / BF16 / Q8_0 / Q4_0 ... / the K-quants). Tensor data is read here with plain file reads, one
tensor at a time, so only one tensor's raw and dequantised copies exist besides the loaded model.

A GGUF file has no `config.json`: the architecture comes from its metadata (`t5.embedding_length`,
`t5.block_count` ...) and from which tensors exist (gated MLP: `ffn_gate`; UMT5: `attn_rel_b` in every
layer). Files whose tensors carry Hugging Face names (some community conversions) load as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import CheckpointError

ARCHITECTURES = ("t5", "t5encoder")
GGUF_MAGIC = b"GGUF"


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _gguf_package() -> Any:
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from err
    return gguf


class GGUFCheckpoint:
    """One T5 GGUF file: `hf_config()` (a transformers-style config dict) and `tensors(dtype)`."""

    def __init__(self, path: str | Path) -> None:
        gguf = _gguf_package()
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as err:  # the package raises ValueError / struct errors on damaged files
            raise CheckpointError(f"{self.path}: not a readable GGUF file, truncated or damaged ({err})") from None
        self.arch = self.field("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise CheckpointError(
                f"{self.path}: a GGUF file of a {self.arch!r} model; expected a T5 / mT5 / UMT5 model "
                f"(general.architecture 't5' or 't5encoder')"
            )
        self.tensor_infos = {t.name: t for t in self.reader.tensors}
        size = self.path.stat().st_size
        integer_types = {gguf.GGMLQuantizationType[t] for t in ("I8", "I16", "I32", "I64")}
        for info in self.tensor_infos.values():
            if gguf.GGMLQuantizationType(info.tensor_type) in integer_types:
                raise CheckpointError(
                    f"{self.path}: tensor {info.name!r} is stored as plain integers "
                    f"({gguf.GGMLQuantizationType(info.tensor_type).name}), which no T5 weight is; supported: F32 / "
                    f"F16 / BF16 / F64 and the quantised GGML types (Q8_0, Q4_K, ...)"
                )
            if info.data_offset + info.n_bytes > size:
                raise CheckpointError(
                    f"{self.path}: truncated GGUF file: tensor {info.name!r} ends at byte "
                    f"{info.data_offset + info.n_bytes} but the file has {size} bytes"
                )
        self.hf_names = self._hf_names()

    def field(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def _key(self, template: str) -> str:
        return template.format(arch=self.arch)

    def size_field(self, template: str, default: int | None = None) -> int:
        """An integer size from the metadata, checked: present (or defaulted), an integer >= 0."""
        key = self._key(template)
        value = self.field(key, default)
        if value is None:
            raise CheckpointError(f"{self.path}: the GGUF metadata has no {key}")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise CheckpointError(f"{self.path}: GGUF metadata {key}={value!r}; expected an integer >= 0")
        return int(value)

    def field_names(self) -> dict[str, str]:
        """Our size fields -> the metadata keys (or tensors) they come from, for errors."""
        gguf = _gguf_package()
        keys, attn = gguf.Keys.LLM, gguf.Keys.Attention
        return {
            "d_model": self._key(keys.EMBEDDING_LENGTH),
            "d_head": self._key(attn.KEY_LENGTH),
            "n_heads": self._key(attn.HEAD_COUNT),
            "d_mlp": self._key(keys.FEED_FORWARD_LENGTH),
            "n_layers": self._key(keys.BLOCK_COUNT),
            "n_decoder_layers": "the decoder blocks' tensors",
            "d_vocab": "token_embd's shape",
        }

    def _hf_names(self) -> dict[str, str]:
        """GGUF tensor name -> Hugging Face T5 parameter name."""
        gguf = _gguf_package()
        n_blocks = self.size_field(gguf.Keys.LLM.BLOCK_COUNT, 0)
        n_dec = self.size_field(gguf.Keys.LLM.DECODER_BLOCK_COUNT, n_blocks) or n_blocks
        for key, count in ((gguf.Keys.LLM.BLOCK_COUNT, n_blocks), (gguf.Keys.LLM.DECODER_BLOCK_COUNT, n_dec)):
            if count > len(self.tensor_infos):  # every block has tensors: a larger count is a corrupt header
                raise CheckpointError(
                    f"{self.path}: GGUF metadata {self._key(key)}={count}, but the file holds only "
                    f"{len(self.tensor_infos)} tensors (every block has several); the header is damaged"
                )
        name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5, max(n_blocks, n_dec))
        # The map goes from HF names to GGUF names: invert it over every name a T5 checkpoint can have.
        inverse: dict[str, str] = {}
        candidates = ["shared", "encoder.final_layer_norm", "decoder.final_layer_norm", "lm_head"]
        for stack, count, sublayers in (
            ("encoder", n_blocks, ("layer.0.SelfAttention", None, "layer.1")),
            ("decoder", n_dec, ("layer.0.SelfAttention", "layer.1.EncDecAttention", "layer.2")),
        ):
            for i in range(count):
                attn, cross, ff = sublayers
                prefix = f"{stack}.block.{i}"
                for proj in ("q", "k", "v", "o", "relative_attention_bias"):
                    candidates.append(f"{prefix}.{attn}.{proj}")
                candidates.append(f"{prefix}.layer.0.layer_norm")
                if cross is not None:
                    candidates += [f"{prefix}.{cross}.{p}" for p in ("q", "k", "v", "o")]
                    candidates.append(f"{prefix}.layer.1.layer_norm")
                candidates += [f"{prefix}.{ff}.DenseReluDense.{w}" for w in ("wi_0", "wi_1", "wo")]
                candidates.append(f"{prefix}.{ff}.layer_norm")
        for hf in candidates:
            mapped = name_map.get_name(hf)
            if mapped is not None:
                inverse.setdefault(f"{mapped}.weight", f"{hf}.weight")
        out = {}
        for name in self.tensor_infos:
            if name in inverse:
                out[name] = inverse[name]
            elif name.startswith(("encoder.", "decoder.", "shared.", "lm_head.")):
                out[name] = name  # already a Hugging Face name
            else:
                raise CheckpointError(f"{self.path}: unexpected tensor {name!r} in a T5 GGUF file")
        if not any(hf.endswith("DenseReluDense.wi_0.weight") for hf in out.values()):
            # a T5 v1.0 (ungated) MLP: llama.cpp writes `wi` as ffn_up, which the inverse named wi_1
            out = {k: v.replace("DenseReluDense.wi_1.", "DenseReluDense.wi.") for k, v in out.items()}
        return out

    def hf_config(self) -> dict[str, Any]:
        """A transformers T5-style config dict from the file's metadata and tensors."""
        gguf = _gguf_package()
        keys = gguf.Keys.LLM
        attn = gguf.Keys.Attention
        hf = set(self.hf_names.values())
        gated = any(n.endswith("wi_0.weight") for n in hf)
        embed = next((i for i, n in self.hf_names.items() if n == "shared.weight"), None)
        if embed is None:
            raise CheckpointError(f"{self.path}: no token embedding (token_embd) in this T5 GGUF file")
        n_layers = self.size_field(keys.BLOCK_COUNT)
        n_dec = sum(1 for n in hf if n.startswith("decoder.block.") and n.endswith("layer.0.SelfAttention.q.weight"))
        per_layer_bias = any(
            n.endswith("relative_attention_bias.weight") and not n.startswith(("encoder.block.0.", "decoder.block.0."))
            for n in hf
        )
        d_model = self.size_field(keys.EMBEDDING_LENGTH)
        n_heads = self.size_field(attn.HEAD_COUNT)
        if n_heads == 0:
            raise CheckpointError(f"{self.path}: GGUF metadata {self._key(attn.HEAD_COUNT)}=0")
        config = {
            "model_type": "umt5" if per_layer_bias else "t5",
            "architectures": ["T5ForConditionalGeneration" if n_dec else "T5EncoderModel"],
            "d_model": d_model,
            "d_ff": self.size_field(keys.FEED_FORWARD_LENGTH),
            "num_layers": n_layers,
            "num_decoder_layers": n_dec or n_layers,
            "num_heads": n_heads,
            "d_kv": self.size_field(attn.KEY_LENGTH, d_model // n_heads),
            "vocab_size": int(self.tensor_infos[embed].shape[-1]),
            "layer_norm_epsilon": float(self.field(self._key(attn.LAYERNORM_RMS_EPS), 1e-6)),
            "relative_attention_num_buckets": self.size_field(attn.REL_BUCKETS_COUNT, 32),
            "relative_attention_max_distance": 128,  # not stored in GGUF; every released T5 uses 128
            "feed_forward_proj": "gated-gelu" if gated else "relu",
            "decoder_start_token_id": int(self.field(self._key(keys.DECODER_START_TOKEN_ID), 0)),
            "pad_token_id": int(self.field("tokenizer.ggml.padding_token_id", 0)),
            "eos_token_id": int(self.field("tokenizer.ggml.eos_token_id", 1)),
            # v1.0 ties and scales logits; v1.1 / mT5 / UMT5 (gated) have their own lm_head
            "tie_word_embeddings": not gated,
        }
        return config

    def stored_dtype(self) -> torch.dtype:
        """The float dtype the weights are stored closest to (quantised types: bfloat16)."""
        gguf = _gguf_package()
        exact = {
            gguf.GGMLQuantizationType.F32: torch.float32,
            gguf.GGMLQuantizationType.F16: torch.float16,
            gguf.GGMLQuantizationType.BF16: torch.bfloat16,
        }
        matrices = [t for t in self.tensor_infos.values() if len(t.shape) == 2]
        largest = max(matrices or self.tensor_infos.values(), key=lambda t: t.n_elements)
        return exact.get(gguf.GGMLQuantizationType(largest.tensor_type), torch.bfloat16)

    def tensors(self, dtype: torch.dtype, wanted: Callable[[str], bool] | None = None) -> Iterator[tuple[str, Tensor]]:
        """`(Hugging Face name, tensor in dtype)`, dequantised with the gguf package, one at a time (tensors
        whose HF name `wanted` rejects are not read)."""
        gguf = _gguf_package()
        with open(self.path, "rb") as f:
            for name, info in sorted(self.tensor_infos.items(), key=lambda kv: kv[1].data_offset):
                if wanted is not None and not wanted(self.hf_names[name]):
                    continue
                buffer = bytearray(info.n_bytes)  # writable, so torch can share it without a copy
                f.seek(info.data_offset)
                f.readinto(buffer)
                raw = np.frombuffer(buffer, dtype=np.uint8)
                shape = tuple(int(d) for d in reversed(info.shape.tolist()))  # GGUF lists dims innermost first
                qtype = gguf.GGMLQuantizationType(info.tensor_type)
                if qtype == gguf.GGMLQuantizationType.F32:
                    values = raw.view(np.float32)
                elif qtype == gguf.GGMLQuantizationType.F16:
                    values = raw.view(np.float16)
                elif qtype == gguf.GGMLQuantizationType.F64:
                    values = raw.view(np.float64)
                else:
                    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                    rows = raw.reshape(-1, shape[-1] // block * type_size)
                    values = gguf.quants.dequantize(rows, qtype)
                tensor = torch.from_numpy(np.ascontiguousarray(values).reshape(shape)).to(dtype)
                yield self.hf_names[name], tensor
