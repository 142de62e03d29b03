"""Checkpoint file formats, each read tensor by tensor (so loading never holds a second copy of the model).

* safetensors (`safetensors_file.py`): our own reader of the documented layout (8-byte header length,
  JSON header, raw data), so every tensor is read straight into its own buffer and a truncated or
  mislabelled file is refused before anything is read; fp32 / fp16 / bf16.
* quantised weights (`quantised.py`): int8 / fp8 weights in the scaled layouts real exports use
  (compressed-tensors, ComfyUI, bitsandbytes int8, optimum-quanto), planned from the headers and dequantised
  on load; any other non-float tensor is refused by name before anything is read.
* GGUF (`gguf_file.py`): llama.cpp's format, parsed and dequantised with the `gguf` package.

Readers yield `(Hugging Face parameter name, tensor)`; `loading.py` maps the names to ours.
"""

from __future__ import annotations

from ..checkpoint_checks import CheckpointError  # one error type for every unreadable checkpoint

__all__ = ["CheckpointError"]
