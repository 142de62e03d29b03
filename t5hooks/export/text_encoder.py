"""An exported text encoder as a diffusers pipeline's text-encoder stage: ONNX Runtime (or a torch.export program)
behind the call surface of `T5EncoderModel`, with the text encoder's interventions and steering vectors in the graph.

    te = encoder.as_text_encoder(intervene={hook: sae}, steer={hook: vector})
    pipe.text_encoder = ExportedTextEncoder.export(te, "text_encoder.onnx")   # ONNX Runtime from here on
    pipe.text_encoder = ExportedTextEncoder.from_onnx("text_encoder.onnx")    # later, from the file alone
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..interventions.steering import SteeringVector
from ..text_encoder import T5TextEncoder, check_call

CONFIG_KEY = "text_encoder_config"  # the transformers config, in the ONNX file's metadata


def baked_edits(text_encoder: T5TextEncoder) -> dict[str, nn.Module]:
    """The text encoder's fixed edits as one module per hook, for export: each steering vector becomes a
    `SteeringVector` (a constant of the graph), applied before an intervention on the same hook (the order the
    capture module uses)."""
    edits: dict[str, nn.Module] = dict(text_encoder.intervene)
    for name, vector in text_encoder.steer.items():
        if vector.ndim != 1:
            raise ValueError(
                f"the steering vector for {name!r} has shape {tuple(vector.shape)}; only [d] vectors are baked into an "
                f"export (for position-dependent steering, splice a module: intervene={{name: module}})"
            )
        steering = SteeringVector(vector.shape[0], dtype=vector.dtype, device=vector.device)
        with torch.no_grad():
            steering.vector.copy_(vector)
        steering.requires_grad_(False)
        edits[name] = nn.Sequential(steering, edits[name]) if name in edits else steering
    return {name: edits[name] for name in text_encoder.model.hook_dict if name in edits}


class ExportedTextEncoder(nn.Module):
    """A text-encoder stage that runs an exported graph: `T5EncoderModel`'s call (`input_ids`, `attention_mask`
    (none: every position attended), `return_dict`) returning a `BaseModelOutput`, with `.dtype`, `.device`,
    `.config`. No weights live in torch: `to(dtype)` sets the dtype the outputs are cast to, `to(device)` the
    `.device` pipelines put the token ids on (outputs come back on the ids' device)."""

    main_input_name = "input_ids"

    def __init__(self, run: Callable[[Tensor, Tensor], Tensor], config: Any, dtype: torch.dtype, source: str) -> None:
        super().__init__()
        self._run = run
        self._config = config
        self._graph_dtype = dtype
        self._out_dtype = dtype
        self._device = torch.device("cpu")
        self.source = source

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def export(
        cls,
        text_encoder: T5TextEncoder,
        path: str | os.PathLike,
        *,
        providers: Any = None,
        **to_onnx_kwargs: Any,
    ) -> ExportedTextEncoder:
        """Export `text_encoder` with its fixed edits (`baked_edits`) to ONNX at `path` (`to_onnx`'s keywords:
        `dtype`, `optimize`, ...; the file carries the text encoder's transformers config), then open it; its outputs
        come in `text_encoder.dtype` (what the pipeline expects; `dtype="float32"` exports a bf16 encoder in fp32)."""
        from .onnx import to_onnx

        if not isinstance(text_encoder, T5TextEncoder):
            raise TypeError(f"expected a T5TextEncoder (encoder.as_text_encoder()), got {type(text_encoder).__name__}")
        metadata = {CONFIG_KEY: text_encoder.config.to_dict()}
        to_onnx(text_encoder.model, path, intervene=baked_edits(text_encoder), metadata=metadata, **to_onnx_kwargs)
        return cls.from_onnx(path, providers=providers).to(text_encoder.dtype)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, *, providers: Any = None, config: Any = None) -> ExportedTextEncoder:
        """Open an encoder graph written by `export` (or by `to_onnx` on a HookedT5Encoder, then pass `config`, a
        transformers config) in ONNX Runtime."""
        from .ort import TORCH_DTYPES, OnnxRunner

        runner = OnnxRunner(path, providers)
        if runner.metadata.get("graph") != "encoder_forward":
            raise ValueError(
                f"{str(path)!r} is not an encoder graph (graph={runner.metadata.get('graph')!r}); export a HookedT5Encoder"
            )
        if runner.patch_names:
            raise ValueError(
                f"{str(path)!r} takes patch inputs {runner.patch_names}; a pipeline stage cannot feed them: export "
                f"with the edits baked in (ExportedTextEncoder.export)"
            )
        if config is None:
            if CONFIG_KEY not in runner.metadata:
                raise ValueError(f"{str(path)!r} carries no text encoder config; pass config= (a transformers config)")
            config = config_from_dict(runner.metadata[CONFIG_KEY])

        def run(tokens: Tensor, mask: Tensor) -> Tensor:
            out = runner(input=tokens, one_zero_attention_mask=mask)["last_hidden_state"]
            return out if isinstance(out, Tensor) else torch.from_numpy(out)

        return cls(run, config, TORCH_DTYPES[runner.output_dtypes["last_hidden_state"]], str(Path(path)))

    @classmethod
    def from_exported(cls, program: Any, config: Any) -> ExportedTextEncoder:
        """A `torch.export` program of an encoder capture (`to_exported_program(encoder, intervene=baked_edits(te))`,
        or loaded from `.pt2`) as the stage; `config`: the text encoder's transformers config (`te.config`)."""
        module = program.module()
        dtype = next((t.dtype for t in program.state_dict.values() if t.is_floating_point()), torch.float32)

        def run(tokens: Tensor, mask: Tensor) -> Tensor:
            with torch.no_grad():  # an inference stage, as the ONNX Runtime one
                return module(tokens, mask, {})["last_hidden_state"]

        return cls(run, config, dtype, "torch.export program")

    # ---- what pipelines read ----------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self._out_dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def config(self) -> Any:
        return self._config

    def extra_repr(self) -> str:
        return f"source={self.source!r}, graph dtype={self._graph_dtype}, outputs={self._out_dtype}"

    def to(self, *args: Any, **kwargs: Any) -> ExportedTextEncoder:
        """Record the device the outputs go to and the dtype they are cast to (the graph itself is fixed)."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            self._device = torch.device(device)
        if dtype is not None:
            if not dtype.is_floating_point:
                raise TypeError(f"an exported text encoder's outputs are floating point; got dtype {dtype}")
            self._out_dtype = dtype
        return self

    # ---- the call ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        from transformers.modeling_outputs import BaseModelOutput

        graph_only = "its graph returns last_hidden_state only"
        refused = {
            "inputs_embeds": inputs_embeds,
            "output_attentions": output_attentions,
            "output_hidden_states": output_hidden_states,
        }
        check_call(
            "ExportedTextEncoder",
            input_ids,
            {name: (value, graph_only) for name, value in refused.items()},
            kwargs,
            takes="input_ids, attention_mask, return_dict",
        )
        tokens = input_ids.long()
        mask = torch.ones_like(tokens) if attention_mask is None else attention_mask.long()
        last = self._run(tokens, mask).to(device=input_ids.device, dtype=self._out_dtype)
        result = BaseModelOutput(last_hidden_state=last)
        return result.to_tuple() if return_dict is False else result


def config_from_dict(values: dict[str, Any]) -> Any:
    """A transformers config from its `to_dict()` (T5 / MT5 / UMT5)."""
    from transformers import AutoConfig

    values = dict(values)
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ValueError("the stored text encoder config has no model_type")
    return AutoConfig.for_model(model_type, **values)
