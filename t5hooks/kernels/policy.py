"""Where the fused kernels run: decided once, when `t5hooks.kernels` is first imported.

* `TRITON_AVAILABLE`: the triton package is installed (its import is deferred to the first kernel launch).
* `INTERPRETED`: `TRITON_INTERPRET=1` was set before t5hooks was imported, so the kernels run on CPU
  under Triton's interpreter (how CPU-only CI tests them). Triton reads the same variable once, when
  the kernels are defined, so reading it later would not change what runs.

The model asks `fuses_by_default(device)` whether an `attn_impl="auto"` layer fuses, and
`layer_backend(device)` which `relbias_attention` backend a fused layer calls.
"""

from __future__ import annotations

import importlib.util
import os

import torch

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
INTERPRETED = TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"


def fuses_by_default(device: torch.device) -> bool:
    """An `attn_impl="auto"` layer runs the fused kernels on CUDA when triton is installed."""
    return device.type == "cuda" and TRITON_AVAILABLE


def layer_backend(device: torch.device) -> str:
    """The `relbias_attention` backend of a fused layer: "triton" on CPU when the kernels are interpreted
    (except while `torch.export` traces: exported graphs hold standard ops), else "auto" (Triton on CUDA,
    the reference elsewhere)."""
    if INTERPRETED and device.type != "cuda" and not torch.compiler.is_exporting():
        return "triton"
    return "auto"
