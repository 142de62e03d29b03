"""ONNX export of capture modules: logits and the captured activations as named graph outputs.

The graph is traced with `torch.onnx.export(..., dynamo=True)` from a flat wrapper around a
`CaptureModule` (tensors in, a tuple out), then its inputs and outputs are named here with the
ONNX IR: `input`, `decoder_input`, `one_zero_attention_mask`, `decoder_attention_mask`,
`patch.<hook name>`; outputs `logits` and each captured hook name. Naming is done by us, not by
the exporter, because three things it can get wrong are normal here:

* one tensor under two names (`decoder.{l}.hook_resid_post` is `decoder.{l+1}.hook_resid_pre`),
* an output that is a graph input (a "replace"-patched name that is also captured),
* an internal value that already carries a name we want for an output.

`name_graph_io` gives each output its own value (an Identity node where needed), moves
colliding internal names out of the way, then names everything; the saved file is checked
with `onnx.checker` (path based, so external data works).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch
from torch import Tensor, nn

from ..atomic import atomic_path
from ..capture import CaptureBase, EncoderCaptureModule
from ..dtypes import EXPORT_DTYPES, parse_dtype
from ..hook_io import NameFilter
from .axes import output_axes
from .metadata import METADATA_PREFIX
from .torch_export import as_capture, dynamic_shapes, example_inputs

PATCH_PREFIX = "patch."
# Protobuf cannot hold a model over 2 GiB: weights beyond this size go to `<file>.data` next to it.
EXTERNAL_DATA_THRESHOLD = 1 << 30


def patch_input_name(hook_name: str) -> str:
    """Graph input that carries the patch for `hook_name`."""
    return PATCH_PREFIX + hook_name


def to_onnx(
    model: Any,
    path: str | os.PathLike,
    capture: NameFilter = (),
    patch: NameFilter = (),
    dynamic: bool = True,
    *,
    patch_mode: str | Mapping[str, str] = "replace",
    dtype: torch.dtype | str | None = None,
    opset: int | None = None,
    external_data: bool | None = None,
    example: tuple[Any, ...] | None = None,
    overwrite: bool = True,
    verify: Callable[[Path], None] | None = None,
    optimize: bool = False,
    quantize: str | None = None,
    intervene: Mapping[str, nn.Module] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Export `model` (a HookedEncoderDecoder or HookedT5Encoder, or a ready `model.capture(...)`) to ONNX.

    Graph inputs: `input` `[B,E]`, `decoder_input` `[B,D]`, `one_zero_attention_mask` `[B,E]`,
    `decoder_attention_mask` `[B,D]` (int64; `OnnxRunner` infers missing masks from the pad token, as the eager model), then
    `patch.<name>` per patched hook (float, the activation's shape for "replace", broadcastable
    for "add"). Outputs: `logits` `[B,D,d_vocab]` then each captured hook name, in hook order.
    With `dynamic`, batch, encoder and decoder lengths vary (decoder length 1 included). A HookedT5Encoder's
    graph takes `input`, `one_zero_attention_mask` and the patches, and outputs `last_hidden_state` first.
    `dtype`: "float32" or "float16" (the weights are converted on a copy; default: the model's).
    `external_data`: weights in `<path>.<random>.data` beside it (default: only when they exceed 1 GiB).
    The file is written atomically (see `save_checked`): `verify(temp_path)` may raise to keep the previous
    file; `overwrite=False` refuses an existing `path` (FileExistsError, before exporting).
    `optimize`: fuse RMSNorm and GELU with ONNX Runtime's transformer optimiser (outputs kept, checked);
    `quantize="int8"`: int8 weight matmuls, activations quantised per call (opt-in: changes the numbers).
    Both see `t5hooks.export.ort_optimize`; neither works with external data (graphs over 2 GiB).
    `intervene={hook name: module}`: spliced modules (SAEs, probes, ...) become part of the graph; their side
    outputs follow as `"<hook name>.<output>"` (e.g. `decoder.1.hook_resid_post.features`).
    `metadata`: extra JSON-serialisable entries for the file's metadata (`OnnxRunner(path).metadata`).
    Returns the path. Raises ValueError for unknown hook names, a bad path or dtype.
    """
    path = _checked_path(path)
    if quantize is not None and quantize != "int8":
        raise ValueError(f"quantize={quantize!r}; valid: 'int8' or None")
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    extra = dict(metadata or {})
    reserved = sorted({"graph", "config", "dtype", "capture", "patch_modes"} & set(extra))
    if reserved:
        raise ValueError(f"metadata keys {reserved} are t5hooks' own; use other names")
    cap = _capture_in_dtype(as_capture(model, capture, patch, patch_mode, intervene), dtype).eval()
    args = example if example is not None else example_inputs(cap)
    n_inputs = len(cap.INPUT_NAMES)
    patches = args[n_inputs]
    patch_names = cap.patch_names
    if set(patches) != set(patch_names):
        raise ValueError(f"example patches {sorted(patches)} do not match the patch set {sorted(patch_names)}")
    flat_args = (*args[:n_inputs], *(patches[n] for n in patch_names))
    shapes = None
    if dynamic:
        spec = dynamic_shapes(cap, patches)
        shapes = spec[:n_inputs]
        if patch_names:  # `*patches` binds as one tuple argument (absent when empty)
            shapes = (*shapes, tuple(spec[n_inputs][n] for n in patch_names))
    input_names = [*cap.INPUT_NAMES, *(patch_input_name(n) for n in patch_names)]
    output_names = _output_names(cap, args)
    flat = _FlatEncoderCapture(cap) if isinstance(cap, EncoderCaptureModule) else _FlatCapture(cap)
    program = export_graph(flat, flat_args, shapes, opset)
    graph = program.model.graph
    name_graph_io(graph, input_names, output_names)
    if dynamic:
        for value in graph.outputs:
            side_output = value.name not in output_names[: 1 + len(cap.names)]
            set_axes(value, None if side_output else output_axes(value.name, cap.model.layout))
    graph_kind = "encoder_forward" if isinstance(cap, EncoderCaptureModule) else "forward"
    write_metadata(
        program.model, graph_kind, cap.model.cfg, capture=list(cap.names), patch_modes=cap.patch_modes, **extra
    )
    if optimize or quantize:
        verify = _rewritten_then(verify, optimize, quantize)
    save_checked(program.model, path, external_data, verify=verify, overwrite=overwrite)
    return path


def _rewritten_then(
    verify: Callable[[Path], None] | None, optimize: bool, quantize: str | None
) -> Callable[[Path], None]:
    """Rewrite the temporary file (fusions, int8) before `verify` sees it and before it takes its final name."""
    from .ort_optimize import optimize_onnx, quantize_onnx

    def rewrite_and_verify(tmp: Path) -> None:
        if optimize:
            optimize_onnx(tmp)
        if quantize:
            quantize_onnx(tmp, mode=quantize)
        if verify is not None:
            verify(tmp)

    return rewrite_and_verify


def _output_names(cap: CaptureBase, args: tuple[Any, ...]) -> list[str]:
    """The capture's output keys for these inputs (its main output, captured names, then interventions' side
    outputs, whose names only the modules know: one eager run finds them)."""
    if not cap.intervene_names:
        return [cap.OUTPUT, *cap.names]
    with torch.no_grad():
        return list(cap(*args))


class _FlatCapture(nn.Module):
    """`cap` with tensors in (patches positional, in patch-set order) and a tuple out (dict order)."""

    def __init__(self, cap: CaptureBase) -> None:
        super().__init__()
        self.cap = cap

    def forward(
        self,
        input: Tensor,
        decoder_input: Tensor,
        one_zero_attention_mask: Tensor,
        decoder_attention_mask: Tensor,
        *patches: Tensor,
    ) -> tuple[Tensor, ...]:
        out = self.cap(
            input,
            decoder_input,
            one_zero_attention_mask,
            decoder_attention_mask,
            dict(zip(self.cap.patch_names, patches)),
        )
        return tuple(out.values())


class _FlatEncoderCapture(_FlatCapture):
    """The same for an encoder capture: `(input, one_zero_attention_mask, *patches)`."""

    def forward(self, input: Tensor, one_zero_attention_mask: Tensor, *patches: Tensor) -> tuple[Tensor, ...]:
        out = self.cap(input, one_zero_attention_mask, dict(zip(self.cap.patch_names, patches)))
        return tuple(out.values())


# ---- shared by the forward and the generation graphs ------------------------------------------


def export_graph(module: nn.Module, args: tuple[Any, ...], shapes: Any, opset: int | None) -> Any:
    """`torch.onnx.export(dynamo=True)` of an eval-mode module, quietly; returns the ONNXProgram."""
    with _quiet_exporter():
        program = torch.onnx.export(
            module.eval(), args, dynamo=True, dynamic_shapes=shapes, opset_version=opset, verbose=False, optimize=True
        )
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    return program


def name_graph_io(graph: ir.Graph, input_names: Sequence[str], output_names: Sequence[str]) -> None:
    """Name the graph's inputs and outputs exactly `input_names` / `output_names` (in order).

    An output that is a graph input, an initializer, has no producer, or repeats an earlier output
    gets its own Identity node: ONNX names values, so two names need two values. Any other value
    already carrying one of the wanted names is renamed first, so the graph stays in SSA form.
    """
    if len(graph.inputs) != len(input_names) or len(graph.outputs) != len(output_names):
        raise RuntimeError(
            f"exported graph has {len(graph.inputs)} inputs / {len(graph.outputs)} outputs; expected "
            f"{len(input_names)} {list(input_names)} / {len(output_names)} {list(output_names)}"
        )
    for names, what in ((input_names, "input"), (output_names, "output")):
        if len(set(names)) != len(names):
            raise ValueError(f"graph {what} names must be unique, got {list(names)}")
    graph_inputs = set(graph.inputs)
    seen: set[ir.Value] = set()
    for i, value in enumerate(list(graph.outputs)):
        if value in graph_inputs or value in seen or value.is_initializer() or value.producer() is None:
            node = ir.node("Identity", inputs=[value])
            graph.append(node)
            copy_value = node.outputs[0]
            copy_value.shape, copy_value.type = value.shape, value.type
            graph.outputs[i] = copy_value
            value = copy_value
        seen.add(value)

    io_values = [*graph.inputs, *graph.outputs]
    wanted = set(input_names) | set(output_names)
    taken = {v.name for v in _all_values(graph) if v.name is not None}
    counter = 0

    def fresh(base: str) -> str:
        nonlocal counter
        while True:
            counter += 1
            candidate = f"{base}__{counter}"
            if candidate not in taken and candidate not in wanted:
                taken.add(candidate)
                return candidate

    io_set = set(io_values)
    for value in _all_values(graph):
        if value not in io_set and value.name in wanted:
            value.name = fresh(value.name)
    for value in io_values:  # two passes: an I/O value may hold another's final name
        value.name = fresh("io")
    for value, name in zip(graph.inputs, input_names):
        value.name = name
    for value, name in zip(graph.outputs, output_names):
        value.name = name


def _all_values(graph: ir.Graph) -> Iterator[ir.Value]:
    """Every value of the graph and its subgraphs: inputs, initializers, node outputs."""
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from node.outputs


def set_axes(value: ir.Value, axes: tuple | None) -> None:
    """Label `value`'s varying dims with the axis names of axes.py; check the others are static.

    A dim the table says varies but the graph has fixed means the exporter specialised it: the
    graph would fail at other sizes, so this raises instead of writing it. `axes=None` (an
    intervention's side output, whose axes no table knows): the exporter's shape is kept as it is."""
    shape = value.shape
    if axes is None:
        return
    if shape is None or len(shape) != len(axes):
        raise RuntimeError(f"output {value.name!r} has shape {shape}; expected rank {len(axes)} (axes {axes})")
    dims = []
    for dim, axis in zip(shape, axes):
        if axis is None:
            dims.append(dim)
        elif isinstance(dim, int):
            raise RuntimeError(f"the exporter fixed the {axis!r} axis of {value.name!r} to {dim}: {shape}")
        else:
            dims.append(ir.SymbolicDim(axis))
    value.shape = ir.Shape(dims)


def write_metadata(model: ir.Model, graph_kind: str, cfg: Any, **extra: Any) -> None:
    """What the runner and generator need to know, as JSON in the model's metadata_props."""
    props = {
        "graph": graph_kind,
        "config": {
            k: getattr(cfg, k)
            for k in (
                "d_vocab",
                "n_decoder_layers",
                "n_heads",
                "d_head",
                "pad_token_id",
                "eos_token_id",
                "decoder_start_token_id",
            )
        },
        "dtype": str(cfg.dtype).removeprefix("torch."),
        **extra,
    }
    for key, value in props.items():
        model.metadata_props[METADATA_PREFIX + key] = json.dumps(value)
    model.producer_name = "t5hooks"


def save_checked(
    model: ir.Model,
    path: Path,
    external_data: bool | None,
    *,
    verify: Callable[[Path], None] | None = None,
    overwrite: bool = True,
) -> None:
    """Save atomically and run `onnx.checker` (then `verify(temp_path)`, if given) before the file takes
    its final name: a failed check or a kill leaves the previous file (and its weights) as they were.

    Weights go to `<name>.<random>.data` beside the graph when asked or when over the threshold; the name
    is new on every save, so the previous graph's weights are never overwritten, and weights files no
    longer referenced by the graph are removed once the new graph is in place.
    """
    path = Path(path)
    if external_data is None:
        external_data = (
            sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
            > EXTERNAL_DATA_THRESHOLD
        )
    data_name = f"{path.name}.{uuid.uuid4().hex[:8]}.data" if external_data else None
    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            ir.save(model, tmp, external_data=data_name)
            onnx.checker.check_model(str(tmp))  # the path form follows external data and allows > 2 GiB
            if verify is not None:
                verify(tmp)
    except BaseException:
        if data_name is not None:
            (path.parent / data_name).unlink(missing_ok=True)
        raise
    for stale in external_data_files(path):
        if stale.name != data_name:
            stale.unlink(missing_ok=True)


def external_data_files(path: Path) -> list[Path]:
    """Weights files written for the graph at `path` (`<name>.data`, `<name>.<random>.data`)."""
    pattern = re.compile(re.escape(path.name) + r"(\.[0-9a-f]{8})?\.data")
    return [p for p in path.parent.glob(path.name + "*.data") if pattern.fullmatch(p.name)]


def _checked_path(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"ONNX files must end in .onnx, got {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; give a file path ending in .onnx")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"cannot write {str(path)!r}: directory {str(parent)!r} is not writable")
    return path


def model_in_dtype(model: nn.Module, dtype: torch.dtype | str | None) -> nn.Module:
    """`model` itself when it already has `dtype` (or none is asked), else a converted copy."""
    dtype = parse_dtype(dtype, allowed=EXPORT_DTYPES, what="export dtype")
    if dtype is None or model.W_E.dtype == dtype:
        return model
    return copy.deepcopy(model).to(dtype)


def _capture_in_dtype(cap: CaptureBase, dtype: torch.dtype | str | None) -> CaptureBase:
    model = model_in_dtype(cap.model, dtype)
    if model is cap.model:
        return cap
    intervene = {name: copy.deepcopy(m).to(model.W_E.dtype) for name, m in cap.intervene.items()}
    return type(cap)(  # the same kind of capture (encoder-decoder or encoder stack) over the converted copy
        model, list(cap.names), patch=list(cap.patch_modes), patch_mode=dict(cap.patch_modes), intervene=intervene
    )


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress chatter and its known-harmless warnings (axis renaming notes,
    missing torchvision ops, pytree deprecations); errors still raise."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        registration.setLevel(level)
