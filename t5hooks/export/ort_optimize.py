"""Rewrites of an exported forward graph for ONNX Runtime on CPU: operator fusions and int8 weights.

* `optimize_onnx`: ONNX Runtime's transformer optimiser (`onnxruntime.transformers.optimizer`,
  model type "t5", Python fusions only, so the file stays portable across machines). It fuses
  T5's RMSNorm into `SimplifiedLayerNormalization` (and residual add + norm into
  `SkipSimplifiedLayerNormalization`) and GELU into one node. A fusion that would swallow a
  captured activation (an RMSNorm's `hook_scale` / `hook_normalized`) is switched off, and the
  result is checked: every named output must still be produced.
* `quantize_onnx`: dynamic int8 quantisation of the weight matmuls
  (`onnxruntime.quantization.quantize_dynamic`, int8 weights per output channel, activations
  quantised per call; matmuls of two activations, the attention scores, stay fp32). Opt-in: it
  changes the numbers (see benchmarks/RESULTS.md for the logit error and greedy agreement).

Both write through `atomic_path` and keep the graph's t5hooks metadata, adding what was done.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import onnx

from ..atomic import atomic_path
from .metadata import METADATA_PREFIX, read_metadata

QUANTIZE_MODES = ("int8",)
# Hook names whose values exist only inside an RMSNorm: a fused norm node would not produce them.
NORM_INTERNALS = ("hook_scale", "hook_normalized")


def optimize_onnx(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Fuse RMSNorm and GELU with ORT's transformer optimiser, keeping every named output; returns the path
    written (`out`, default: `path` itself). Raises RuntimeError if a fusion dropped an output."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    path = Path(path)
    out = Path(out) if out is not None else path
    model = _load_inline(path)
    outputs = [o.name for o in model.graph.output]
    cfg = _metadata(model).get("config", {})
    options = FusionOptions("t5")
    if any(name.endswith(NORM_INTERNALS) for name in outputs):
        options.enable_layer_norm = False
        options.enable_skip_layer_norm = False
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "symbolic shape inference disabled or failed" is expected: shapes are dynamic
    try:
        optimized = optimize_model(
            model,
            model_type="t5",
            num_heads=int(cfg.get("n_heads", 0)),
            hidden_size=0,
            optimization_options=options,
            opt_level=0,  # Python fusions only; ORT's own (machine-specific) rewrites happen at session creation
            use_gpu=False,
        )
    finally:
        quiet.setLevel(level)
    result = optimized.model
    _check_outputs(result, outputs, "the transformer optimiser")
    fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    _set_metadata(result, "optimized", fused)
    _save(result, out)
    return out


def quantize_onnx(path: str | os.PathLike, out: str | os.PathLike | None = None, mode: str = "int8") -> Path:
    """Dynamic int8 quantisation of the weight matmuls (per-channel int8 weights); returns the path written."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize={mode!r}; valid: {', '.join(QUANTIZE_MODES)}")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    out = Path(out) if out is not None else path
    model = _load_inline(path)
    outputs = [o.name for o in model.graph.output]
    props = {p.key: p.value for p in model.metadata_props}
    with atomic_path(out) as tmp:
        quantize_dynamic(
            str(path),
            str(tmp),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            extra_options={"MatMulConstBOnly": True},
        )
        result = onnx.load(str(tmp))
        _check_outputs(result, outputs, "int8 quantisation")
        del result.metadata_props[:]
        for key, value in props.items():
            result.metadata_props.add(key=key, value=value)
        _set_metadata(result, "quantized", mode)
        onnx.save(result, str(tmp))
        import onnxruntime as ort

        ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])  # quantised ops are ORT's
    return out


def _load_inline(path: Path) -> onnx.ModelProto:
    """The graph with its weights inside; a graph with external data (over 2 GiB) cannot be rewritten here."""
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    if any(uses_external_data(t) for t in model.graph.initializer):
        raise ValueError(f"{path}: optimize and quantize need a graph under 2 GiB with its weights inside")
    return model


def _metadata(model: onnx.ModelProto) -> dict:
    return read_metadata({p.key: p.value for p in model.metadata_props})


def _set_metadata(model: onnx.ModelProto, key: str, value: object) -> None:
    full = METADATA_PREFIX + key
    for prop in model.metadata_props:
        if prop.key == full:
            prop.value = json.dumps(value)
            return
    model.metadata_props.add(key=full, value=json.dumps(value))


def _check_outputs(model: onnx.ModelProto, expected: list[str], what: str) -> None:
    """Every expected output is still a graph output, in order, and something still produces it."""
    names = [o.name for o in model.graph.output]
    produced = {v for node in model.graph.node for v in node.output}
    produced |= {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    lost = [n for n in expected if n not in produced]
    if names != expected or lost:
        raise RuntimeError(f"{what} changed the graph's outputs: expected {expected}, got {names}; lost {lost}")


def _save(model: onnx.ModelProto, out: Path) -> None:
    """Write and verify by loading it into ONNX Runtime (the fused ops are ORT's, which `onnx.checker` rejects)."""
    import onnxruntime as ort

    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
        ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
