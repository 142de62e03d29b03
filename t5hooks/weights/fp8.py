"""fp8 (e4m3fn / e5m2) weights: dequantised on load, with or without per-tensor (or per-row) scales.

Community fp8 T5 encoders come in two flavours: plain casts (`weight.to(float8_e4m3fn)`, no scales) and
"scaled" files where `<module>.weight` holds `weight / scale` in fp8 and a small fp32 tensor holds the
scale, named `<module>.scale_weight` (ComfyUI's scaled fp8) or `<module>.weight_scale` (compressed-tensors,
FBGEMM). A scale is a scalar, or one value per output row (`[out]` or `[out, 1]`). Input-activation scales
(`scale_input`, `input_scale`) and the `scaled_fp8` marker tensor carry no weights and are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIXES = ("scale_weight", "weight_scale")
IGNORED_SUFFIXES = ("scale_input", "input_scale")
MARKER_KEYS = ("scaled_fp8",)


def scale_key(weight_name: str, names: Iterable[str]) -> str | None:
    """The name of `weight_name`'s scale tensor among `names`, if it has one."""
    if not weight_name.endswith(".weight"):
        return None
    module = weight_name.removesuffix(".weight")
    present = set(names)
    for suffix in SCALE_SUFFIXES:
        if f"{module}.{suffix}" in present:
            return f"{module}.{suffix}"
    return None


def is_auxiliary(name: str) -> bool:
    """Scale and marker tensors: read only to dequantise another tensor, never loaded as weights."""
    return name in MARKER_KEYS or name.rsplit(".", 1)[-1] in (*SCALE_SUFFIXES, *IGNORED_SUFFIXES)


def check_scale(scale: Tensor, weight_shape: tuple[int, ...], what: str) -> None:
    """A scale must be a scalar or hold one value per output row."""
    rows = weight_shape[0] if weight_shape else 1
    if scale.numel() not in (1, rows):
        raise ValueError(
            f"{what}: fp8 scale of shape {tuple(scale.shape)} does not fit a weight of shape {tuple(weight_shape)}; "
            f"expected a scalar or one value per output row ({rows})"
        )


def dequantise(weight: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """`weight * scale` computed in fp32, returned in `dtype` (`weight` `[rows, ...]`; scale None, a scalar, or
    one value per row)."""
    out = weight.float()
    if scale is not None:
        scale = scale.float()
        out.mul_(scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, *([1] * (out.ndim - 1))))
    return out.to(dtype)
