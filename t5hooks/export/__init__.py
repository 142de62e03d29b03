"""Export capture modules: torch.export (.pt2), TorchScript, ONNX; and run ONNX graphs in ONNX Runtime."""

from .axes import activation_axes
from .torch_export import (
    example_inputs,
    load_exported,
    load_torchscript,
    save_exported,
    save_torchscript,
    to_exported_program,
    to_torchscript,
)

__all__ = [
    "activation_axes",
    "example_inputs",
    "load_exported",
    "load_torchscript",
    "save_exported",
    "save_torchscript",
    "to_exported_program",
    "to_torchscript",
]
