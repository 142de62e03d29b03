"""Greedy generation on ONNX Runtime: an encoder graph and a one-step decoder graph with a KV cache.

Both graphs are exported from the model's own forward (`encode`, `Attention.project_kv`,
`decode(..., cache=DecoderCache)`), so they compute exactly what `model.generate` computes.

    encoder.onnx  input [B,E], one_zero_attention_mask [B,E]
                  -> encoder_out [B,E,d_model], cross.{l}.key / cross.{l}.value [B,H,E,d_head] per
                     decoder layer, then captured encoder-side activations
    decoder.onnx  decoder_input [B,1], one_zero_attention_mask [B,E], past.{l}.key / .value
                  [B,H,P,d_head] (P = steps so far, 0 at the first step), cross.{l}.key / .value
                  -> logits [B,1,d_vocab], present.{l}.key / .value [B,H,P+1,d_head], then captured
                     decoder activations of this step (query length 1)

Captured names split by where they are computed: the encoder stack, `hook_encoder_out` and the
cross-attention keys/values (`decoder.{l}.cross_attn.hook_k/hook_v`, projected once from the
encoder output, as the eager KV cache does) come from the encoder graph; every other decoder
name comes from each step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..atomic import MANIFEST, ArtefactError, begin_multi_file, state_fingerprint, verify_manifest, write_manifest
from ..hook_io import HookIO, NameFilter
from ..hook_registry import HookLayout, default_layout
from ..kv_cache import DecoderCache
from .axes import BATCH, CACHE_AXES, ENC, INPUT_AXES, PRESENT, activation_axes, step_activation_axes
from .onnx import (
    export_graph,
    external_data_files,
    model_in_dtype,
    name_graph_io,
    save_checked,
    set_axes,
    write_metadata,
)
from .ort import OnnxRunner
from .torch_export import axes_spec, export_dims

ENCODER_FILE, DECODER_FILE = "encoder.onnx", "decoder.onnx"
MANIFEST_KIND = "onnx-generator"


def is_encoder_side(name: str, layout: HookLayout | None = None) -> bool:
    """Computed once per input by the encoder graph: no axis counts decoder positions (the encoder stack,
    its output, the cross-attention K/V), as the hook registry declares."""
    return (default_layout() if layout is None else layout).spec(name).side == "encoder"


def cache_names(n_layers: int, kind: str) -> list[str]:
    """`{kind}.{l}.key`, `{kind}.{l}.value` for every decoder layer (kind: past, present, cross)."""
    return [f"{kind}.{layer}.{kv}" for layer in range(n_layers) for kv in ("key", "value")]


class EncoderGraph(nn.Module):
    """`model.encode` plus each decoder layer's cross-attention `project_kv` of its output."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, tuple(names)

    def forward(self, input: Tensor, one_zero_attention_mask: Tensor) -> tuple[Tensor, ...]:
        io = HookIO(self.names)
        encoder_out = self.model.encode(input, one_zero_attention_mask, io)  # [B,E,d_model]
        cross = [t for block in self.model.decoder for t in block.cross_attn.project_kv(encoder_out, io)]
        return (encoder_out, *cross, *(io.outputs[n] for n in self.names))


class DecoderStepGraph(nn.Module):
    """One `model.decode` step with a `DecoderCache` holding the past self-attention K/V and the cross K/V."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, tuple(names)

    def forward(
        self, decoder_input: Tensor, one_zero_attention_mask: Tensor, past: list[Tensor], cross: list[Tensor]
    ) -> tuple[Tensor, ...]:

        n_layers = len(self.model.decoder)
        cache = DecoderCache(n_layers)
        for layer in range(n_layers):
            cache.self_attn[layer].update(past[2 * layer], past[2 * layer + 1], append=False)
            cache.cross_attn[layer].update(cross[2 * layer], cross[2 * layer + 1], append=False)
        io = HookIO(self.names)
        logits = self.model.decode(decoder_input, None, one_zero_attention_mask, None, io, cache=cache)
        present = [t for c in cache.self_attn for t in (c.k, c.v)]
        return (logits, *present, *(io.outputs[n] for n in self.names))


def to_onnx_generator(
    model: Any,
    directory: str | os.PathLike,
    capture: NameFilter = (),
    *,
    dtype: torch.dtype | str | None = None,
    opset: int | None = None,
    overwrite: bool = True,
) -> Path:
    """Write `encoder.onnx` and `decoder.onnx` for `OnnxGenerator` into `directory` (created if needed),
    then `t5hooks-manifest.json` (the model's fingerprint, each file's size and SHA-256), which
    `OnnxGenerator` checks: a directory whose export was interrupted, or that mixes two exports, is refused.

    `capture`: hook names or globs to return during generation (see the module docstring for which
    graph computes which). `overwrite=False` refuses a directory that already holds graphs.
    Returns the directory. Raises ValueError for unknown names or a bad path.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{str(directory)!r} exists and is not a directory")
    if not directory.parent.is_dir():
        raise ValueError(f"cannot create {str(directory)!r}: {str(directory.parent)!r} does not exist")
    existing = [f for f in (ENCODER_FILE, DECODER_FILE, MANIFEST) if (directory / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{directory} already holds {existing} (pass overwrite=True to replace them)")
    names = model.resolve_names(capture) if capture else []
    model = model_in_dtype(model, dtype).eval()
    cfg = model.cfg
    layout = model.layout
    encoder_names = [n for n in names if is_encoder_side(n, layout)]
    decoder_names = [n for n in names if not is_encoder_side(n, layout)]
    L, H, d = cfg.n_decoder_layers, cfg.n_heads, cfg.d_head
    dims = export_dims()
    fingerprint = state_fingerprint(model)

    # Example: batch 2, encoder 7, 3 cached steps (sizes >= 2, so no axis is specialised to 0 or 1).
    g = torch.Generator().manual_seed(0)
    device, float_dtype = model.W_E.device, model.W_E.dtype
    tokens = torch.randint(0, cfg.d_vocab, (2, 7), generator=g).to(device)
    mask = torch.ones(2, 7, dtype=torch.long, device=device)

    encoder_shapes = (axes_spec(INPUT_AXES["input"], dims), axes_spec(INPUT_AXES["one_zero_attention_mask"], dims))
    encoder = export_graph(EncoderGraph(model, encoder_names), (tokens, mask), encoder_shapes, opset)
    encoder_outputs = ["encoder_out", *cache_names(L, "cross"), *encoder_names]
    name_graph_io(encoder.model.graph, ["input", "one_zero_attention_mask"], encoder_outputs)
    _label(
        encoder.model.graph.outputs,
        [(BATCH, ENC, None), *[CACHE_AXES["cross"]] * (2 * L), *(activation_axes(n, layout) for n in encoder_names)],
    )
    write_metadata(encoder.model, "encoder", cfg, capture=encoder_names, fingerprint=fingerprint)

    def kv(length: int) -> list[Tensor]:
        return [torch.randn(2, H, length, d, generator=g).to(device=device, dtype=float_dtype) for _ in range(2 * L)]

    step_args = (torch.randint(0, cfg.d_vocab, (2, 1), generator=g).to(device), mask, kv(3), kv(7))
    step_shapes = (
        {0: dims[BATCH]},
        axes_spec(INPUT_AXES["one_zero_attention_mask"], dims),
        [axes_spec(CACHE_AXES["past"], dims)] * (2 * L),
        [axes_spec(CACHE_AXES["cross"], dims)] * (2 * L),
    )
    step = export_graph(DecoderStepGraph(model, decoder_names), step_args, step_shapes, opset)
    name_graph_io(
        step.model.graph,
        ["decoder_input", "one_zero_attention_mask", *cache_names(L, "past"), *cache_names(L, "cross")],
        ["logits", *cache_names(L, "present"), *decoder_names],
    )
    _label(
        step.model.graph.outputs,
        [
            (BATCH, None, None),
            *[CACHE_AXES["present"]] * (2 * L),
            *(step_activation_axes(n, layout) for n in decoder_names),
        ],
    )
    write_metadata(step.model, "decoder_step", cfg, capture=decoder_names, fingerprint=fingerprint)

    # Both graphs are built: only now touch the directory. Without its manifest it reads as incomplete
    # until the last step, so a kill in between leaves a directory OnnxGenerator refuses, never a mixed pair.
    begin_multi_file(directory)
    save_checked(encoder.model, directory / ENCODER_FILE, None)
    save_checked(step.model, directory / DECODER_FILE, None)
    files = [
        f.name
        for graph in (ENCODER_FILE, DECODER_FILE)
        for f in (directory / graph, *external_data_files(directory / graph))
    ]
    write_manifest(directory, files, kind=MANIFEST_KIND, fingerprint=fingerprint)
    return directory


def _label(values: Sequence[Any], axes: Sequence[tuple]) -> None:
    for value, value_axes in zip(values, axes, strict=True):
        set_axes(value, value_axes)


@dataclass
class OnnxGeneration:
    """What `OnnxGenerator.generate` returns (numpy arrays).

    `tokens` `[B, 1+T]` start with the decoder start token; rows that stopped at EOS are padded.
    `encoder`: captured encoder-side activations (one run). `steps[t]`: the captured decoder
    activations of step t (query length 1; self-attention patterns have t+1 keys).
    """

    tokens: np.ndarray
    encoder: dict[str, np.ndarray] = field(default_factory=dict)
    steps: list[dict[str, np.ndarray]] = field(default_factory=list)

    def stacked(self, name: str) -> np.ndarray:
        """A decoder activation over all steps, concatenated on its decoder-position axis
        (e.g. `decoder.0.hook_resid_post` -> `[B,T,d_model]`). Self-attention scores/patterns and the
        position bias grow a key per step: read those from `steps`."""
        if not self.steps or name not in self.steps[0]:
            captured = sorted(self.steps[0]) if self.steps else []
            raise KeyError(f"{name!r} was not captured per step; captured: {captured}")
        axes = step_activation_axes(name)
        if PRESENT in axes:
            raise ValueError(f"{name!r} has a key axis that grows each step; read it from .steps[t]")
        axis = activation_axes(name).index("decoder")
        return np.concatenate([step[name] for step in self.steps], axis=axis)


class OnnxGenerator:
    """Greedy decoding with the graphs `to_onnx_generator` wrote: same tokens as `model.generate`.

    `OnnxGenerator(directory, providers=None)`; `OnnxGenerator.export(model, directory, capture=...)`
    exports and loads in one call. The directory's manifest is checked first (ArtefactError for an
    interrupted export or graphs of two models); `check_hashes=False` skips the SHA-256 of each file
    (sizes and model fingerprints are still checked), for multi-GB graphs you trust.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        providers: Sequence[Any] | None = None,
        *,
        threads: int | None = None,
        check_hashes: bool = True,
    ) -> None:
        directory = Path(directory)
        for file in (ENCODER_FILE, DECODER_FILE):
            if not (directory / file).is_file():
                raise FileNotFoundError(
                    f"{str(directory / file)!r} not found: write the graphs with "
                    f"to_onnx_generator(model, {str(directory)!r}, capture=...)"
                )
        manifest = verify_manifest(directory, kind=MANIFEST_KIND, hashes=check_hashes)
        self.encoder = OnnxRunner(directory / ENCODER_FILE, providers, threads=threads)
        self.decoder = OnnxRunner(directory / DECODER_FILE, providers, threads=threads)
        prints = {
            "manifest": manifest["fingerprint"],
            ENCODER_FILE: self.encoder.metadata.get("fingerprint"),
            DECODER_FILE: self.decoder.metadata.get("fingerprint"),
        }
        if len(set(prints.values())) != 1:
            raise ArtefactError(
                f"{directory}: the graphs come from different models (fingerprints {prints}); export again"
            )
        self.config = self.decoder.metadata["config"]
        self.n_layers = int(self.config["n_decoder_layers"])
        self.device = torch.device("cuda") if self.decoder.on_cuda else torch.device("cpu")
        past = self.decoder.inputs["past.0.key"]
        self._cache_head_shape = (past.shape[1], past.shape[3])  # (H, d_head), static in the graph
        self._cache_dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}[past.dtype]

    @classmethod
    def export(
        cls,
        model: Any,
        directory: str | os.PathLike,
        capture: NameFilter = (),
        *,
        dtype: torch.dtype | str | None = None,
        opset: int | None = None,
        providers: Sequence[Any] | None = None,
        overwrite: bool = True,
    ) -> OnnxGenerator:
        """`to_onnx_generator(model, directory, ...)` then load the graphs it wrote."""
        path = to_onnx_generator(model, directory, capture, dtype=dtype, opset=opset, overwrite=overwrite)
        return cls(path, providers)

    @property
    def capture(self) -> dict[str, list[str]]:
        return {"encoder": self.encoder.metadata["capture"], "decoder": self.decoder.metadata["capture"]}

    def generate(
        self,
        input: Any,
        max_new_tokens: int = 20,
        *,
        one_zero_attention_mask: Any = None,
        eos_token_id: int | None = None,
        stop_at_eos: bool = True,
    ) -> OnnxGeneration:
        """Greedy tokens for `input` `[B,E]` (padded rows need `one_zero_attention_mask`): argmax each
        step; a row that emitted EOS continues with the pad token; stops when all rows have (as HF)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        tokens = self._user_tensor(input, "input", "integer token ids")
        mask = (
            torch.ones_like(tokens)
            if one_zero_attention_mask is None
            else self._user_tensor(one_zero_attention_mask, "one_zero_attention_mask", "a 0/1 (or bool) mask")
        )
        eos = int(self.config["eos_token_id"] if eos_token_id is None else eos_token_id)
        pad, start = int(self.config["pad_token_id"]), int(self.config["decoder_start_token_id"])
        B = tokens.shape[0]

        encoded = self.encoder(input=tokens, one_zero_attention_mask=mask)
        cross = {name: self._tensor(encoded[name]) for name in cache_names(self.n_layers, "cross")}  # [B,H,E,d]
        H, d = self._cache_head_shape
        empty = torch.zeros(B, H, 0, d, dtype=self._cache_dtype, device=self.device)  # no past at step 0
        past = {name: empty for name in cache_names(self.n_layers, "past")}
        out = torch.full((B, 1), start, dtype=torch.long, device=self.device)
        unfinished = torch.ones(B, dtype=torch.bool, device=self.device)
        steps: list[dict[str, np.ndarray]] = []
        captured = self.decoder.metadata["capture"]
        for _ in range(max_new_tokens):
            result = self.decoder.run({"decoder_input": out[:, -1:], "one_zero_attention_mask": mask, **past, **cross})
            logits = self._tensor(result["logits"])[:, -1]  # [B, d_vocab]
            next_token = logits.float().argmax(dim=-1)
            next_token = torch.where(unfinished, next_token, torch.full_like(next_token, pad))
            out = torch.cat([out, next_token[:, None]], dim=1)
            steps.append({name: _numpy(result[name]) for name in captured})
            past = {name: self._tensor(result[name.replace("past.", "present.", 1)]) for name in past}
            if stop_at_eos:
                unfinished &= next_token != eos
                if not bool(unfinished.any()):
                    break
        encoder_acts = {name: _numpy(encoded[name]) for name in self.encoder.metadata["capture"]}
        return OnnxGeneration(_numpy(out), encoder_acts, steps)

    def _tensor(self, value: Any) -> Tensor:
        """A torch view of a runner output on the session's device (zero-copy from numpy on CPU)."""
        tensor = value if isinstance(value, Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        return tensor.to(self.device)

    def _user_tensor(self, value: Any, what: str, holds: str) -> Tensor:
        tensor = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
        bad_dtype = (
            tensor.is_floating_point() or tensor.is_complex() or (tensor.dtype == torch.bool and what == "input")
        )
        if bad_dtype or tensor.ndim != 2 or 0 in tensor.shape:
            raise ValueError(
                f"{what} must hold {holds} of shape [batch, pos] (batch, pos >= 1); "
                f"got dtype {tensor.dtype}, shape {tuple(tensor.shape)}"
            )
        return tensor.long().to(self.device)


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
