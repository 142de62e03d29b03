"""Export capture modules: torch.export (.pt2), TorchScript, ONNX; and run ONNX graphs in ONNX Runtime."""

from typing import Any

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

# ONNX names load on first use: `import t5hooks.export` does not pull in onnx / onnxruntime.
_LAZY = {
    "to_onnx": ".onnx",
    "OnnxRunner": ".ort",
    "OnnxGenerator": ".onnx_generation",
    "OnnxGeneration": ".onnx_generation",
    "to_onnx_generator": ".onnx_generation",
    "ExportedTextEncoder": ".text_encoder",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        try:
            module = importlib.import_module(_LAZY[name], __name__)
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                f"{name} needs the ONNX packages ({err}); install them with: pip install 't5hooks[onnx]'"
            ) from err
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ExportedTextEncoder",
    "OnnxGeneration",
    "OnnxGenerator",
    "OnnxRunner",
    "activation_axes",
    "example_inputs",
    "load_exported",
    "load_torchscript",
    "save_exported",
    "save_torchscript",
    "to_exported_program",
    "to_onnx",
    "to_onnx_generator",
    "to_torchscript",
]
