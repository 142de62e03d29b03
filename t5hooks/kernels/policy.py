"""Where attention runs: decided once, when `t5hooks.kernels` is first imported.

* `TRITON_AVAILABLE`: the triton package is installed (its import is deferred to the first kernel launch).
* `INTERPRETED`: `TRITON_INTERPRET=1` was set before t5hooks was imported, so the kernels run on CPU
  under Triton's interpreter (how CPU-only CI tests them). Triton reads the same variable once, when
  the kernels are defined, so reading it later would not change what runs.

The model asks `fuses_by_default(device)` whether an `attn_impl="auto"` layer fuses (computes its
attention without materialising scores and pattern), and `layer_backend(device, attn_impl)` which
`relbias_attention` backend a fused layer calls:

* CUDA: the Triton kernels (`"auto"`).
* CPU: PyTorch's `scaled_dot_product_attention` with the position bias and mask as one additive term
  (`"sdpa"`, about 3x faster than materialised attention at t5-small shape), or, for `attn_impl="fused"`
  under `TRITON_INTERPRET=1`, the interpreted Triton kernels (`"triton"`, how CI tests them in the model).
* While `torch.export` traces (ONNX export included), layers materialise their attention as before
  and fused layers run the reference (`"auto"`): exported graphs hold standard ops.

Layers whose scores or pattern are hooked, captured or patched always materialise them.
"""

from __future__ import annotations

import importlib.util
import os

import torch

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
INTERPRETED = TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"


def fuses_by_default(device: torch.device) -> bool:
    """An `attn_impl="auto"` layer fuses on CUDA when triton is installed, and on CPU (SDPA) unless exporting."""
    if device.type == "cuda":
        return TRITON_AVAILABLE
    return device.type == "cpu" and not torch.compiler.is_exporting()


def layer_backend(device: torch.device, attn_impl: str = "fused") -> str:
    """The `relbias_attention` backend of a fused layer (see the module docstring)."""
    if device.type == "cuda" or torch.compiler.is_exporting():
        return "auto"
    if INTERPRETED and attn_impl == "fused":
        return "triton"
    return "sdpa"
