"""Diffusers pipelines whose T5 text encoder is a HookedT5Encoder (see text_encoder.py for the adapter).

    pipe = load_pipeline("PixArt-alpha/PixArt-XL-2-512x512")          # or a local pipeline directory
    encoder = pipe.text_encoder.model                                  # the HookedT5Encoder
    with encoder.hooks(fwd_hooks=[...]):
        image = pipe("a red cat").images[0]

The pipeline is loaded without its T5 component and the encoder's weights are read once, by t5hooks, so a T5-XXL
is never in memory twice. `diffusers` is needed only here (and by the pipelines themselves).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .encoder import HookedT5Encoder
from .text_encoder import T5TextEncoder

# The transformers classes diffusers pipelines load as T5-family text encoders.
T5_CLASSES = ("T5EncoderModel", "UMT5EncoderModel", "MT5EncoderModel", "T5ForConditionalGeneration")


def t5_components(pipeline: str | os.PathLike) -> list[str]:
    """The components of a pipeline (a directory or hub name with `model_index.json`) that are T5-family text
    encoders, e.g. `["text_encoder_2"]` for Flux, `["text_encoder"]` for PixArt."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(str(pipeline))
    return sorted(
        name
        for name, value in index.items()
        if isinstance(value, (list, tuple))
        and len(value) == 2
        and value[0] == "transformers"
        and value[1] in T5_CLASSES
    )


def load_pipeline(
    pipeline: str | os.PathLike,
    component: str | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    encoder: HookedT5Encoder | None = None,
    intervene: Mapping[str, nn.Module] | None = None,
    steer: Mapping[str, Tensor] | None = None,
    pipeline_class: Any = None,
    **from_pretrained_kwargs: Any,
) -> Any:
    """A diffusers pipeline (a local directory or hub name) with its T5 text encoder replaced by a `T5TextEncoder`
    over a `HookedT5Encoder` (`pipe.<component>`; the encoder is `pipe.<component>.model`).

    `component`: which text encoder (default: the pipeline's only T5-family one; `t5_components` lists them).
    `dtype` for every component (the pipeline's `torch_dtype`, the encoder's `dtype`); `device`: `pipe.to(device)`.
    `encoder`: an encoder already loaded (otherwise read from the pipeline's `<component>/` folder, with its
    tokenizer). `intervene` / `steer`: fixed edits of the text encoder (`T5TextEncoder`). `pipeline_class`: default
    `DiffusionPipeline` (the class named in model_index.json). Other keywords go to `from_pretrained`.
    """
    from diffusers import DiffusionPipeline

    found = t5_components(pipeline)
    if component is None:
        if len(found) != 1:
            raise ValueError(
                f"{str(pipeline)!r} has {len(found)} T5-family text encoders {found}; pass component= one of them"
            )
        component = found[0]
    elif component not in found:
        raise ValueError(
            f"{component!r} is not a T5-family text encoder of {str(pipeline)!r}; its T5 components: {found}"
        )
    if component in from_pretrained_kwargs:
        raise ValueError(f"{component}= would replace the hooked encoder; pass encoder= (a HookedT5Encoder) instead")
    cls = pipeline_class or DiffusionPipeline
    pipe = cls.from_pretrained(str(pipeline), dtype=dtype, **{component: None}, **from_pretrained_kwargs)
    if encoder is None:
        hub = {k: from_pretrained_kwargs[k] for k in ("revision", "cache_dir", "token") if k in from_pretrained_kwargs}
        encoder = HookedT5Encoder.from_pretrained(str(pipeline), subfolder=component, dtype=dtype, **hub)
    elif not isinstance(encoder, HookedT5Encoder):
        raise TypeError(f"encoder must be a HookedT5Encoder, got {type(encoder).__name__}")
    setattr(
        pipe,
        component,
        T5TextEncoder(encoder, intervene=intervene, steer=steer, config=_hf_config(pipeline, component)),
    )
    if device is not None:
        pipe.to(device)
    return pipe


def _hf_config(pipeline: str | os.PathLike, component: str) -> Any:
    """The text encoder's own transformers config (what the pipeline would have seen on a T5EncoderModel)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(pipeline), subfolder=component)
