"""Load the model a command names: an encoder-decoder, or the encoder alone for an encoder-only checkpoint."""

from __future__ import annotations

import torch


def load_model(
    name: str | None,
    device: str | None = None,
    dtype: str = "float32",
    subfolder: str | None = None,
    encoder_only: bool = False,
):
    """A HookedEncoderDecoder, or a HookedT5Encoder for an encoder-only checkpoint (or with `encoder_only`)."""
    from ..encoder import HookedT5Encoder
    from ..loading import EncoderOnlyCheckpoint
    from ..model import HookedEncoderDecoder
    from ..pretrained import DEFAULT_MODEL

    torch_dtype = getattr(torch, dtype)
    kwargs = {"device": device, "dtype": torch_dtype}
    if subfolder:
        kwargs["subfolder"] = subfolder
    try:
        if not encoder_only:
            try:
                return HookedEncoderDecoder.from_pretrained(name or DEFAULT_MODEL, **kwargs)
            except EncoderOnlyCheckpoint:
                pass  # a text encoder: load it as one
        return HookedT5Encoder.from_pretrained(name or DEFAULT_MODEL, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load model {name!r}: {err}") from err
