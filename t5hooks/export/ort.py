"""OnnxRunner: run an exported graph in ONNX Runtime with checked inputs, outputs by name.

On a machine with `onnxruntime-gpu` and a GPU the session uses the CUDA execution provider;
torch CUDA tensors then go in and come out through IOBinding (bound by `data_ptr`, no host
copies). Everything else (numpy arrays, CPU tensors, the CPU provider) goes through
`session.run` and comes back as numpy arrays.
"""

from __future__ import annotations

import ast
import difflib
import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from .metadata import read_metadata
from .onnx import PATCH_PREFIX

# ONNX Runtime's type strings -> numpy dtypes (what our graphs use).
ORT_TYPES = {
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
}
TORCH_DTYPES = {
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.bool_): torch.bool,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float64): torch.float64,
}
TOKEN_INPUTS = ("input", "decoder_input")
# Masks the runner infers when they are not given (1 except at pad tokens, as the eager model): mask -> its tokens.
DEFAULT_MASKS = {"one_zero_attention_mask": "input", "decoder_attention_mask": "decoder_input"}
Array = Any  # np.ndarray | torch.Tensor


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # static sizes, axis names, or None (unnamed dynamic)

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype.name}[{dims}]"


def default_providers() -> list[str]:
    """CUDA (then CPU as fallback) when onnxruntime-gpu sees a GPU, else CPU."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


GRAPH_OPTIMIZATION_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(
    threads: int | None = None, dynamic_block_base: int = 4, *, level: str = "all", spinning: bool = True
) -> ort.SessionOptions:
    """Session options: graph optimisations at `level` ("disabled", "basic", "extended", "all"; default all);
    `threads` intra-op threads (default: ONNX Runtime's choice); parallel loops split into dynamically sized
    blocks (`session.dynamic_block_base`; 0 = ORT's static split), which balances the threads better: about
    7% faster on the t5-small forward on 2 CPU cores, neutral for decoding steps. `spinning=False` stops idle
    worker threads from busy-waiting (`session.intra_op.allow_spinning`): kinder to a machine shared with other
    processes. benchmarks/cpu.py times each of these."""
    if level not in GRAPH_OPTIMIZATION_LEVELS:
        raise ValueError(f"level={level!r}; valid: {', '.join(GRAPH_OPTIMIZATION_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = GRAPH_OPTIMIZATION_LEVELS[level]
    if threads is not None:
        options.intra_op_num_threads = threads
    if dynamic_block_base > 0:
        options.add_session_config_entry("session.dynamic_block_base", str(dynamic_block_base))
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRunner:
    """`OnnxRunner(path)(input=..., decoder_input=..., one_zero_attention_mask=..., patches=...)`.

    Returns `dict[str, np.ndarray]` in the graph's output order ("logits", then captured names).
    With the CUDA provider and torch CUDA tensors as inputs, returns torch CUDA tensors instead
    (IOBinding, no host copies). Inputs may be numpy arrays or torch tensors; masks not given are
    inferred from the pad token as the eager model does; `patches={"<hook name>": tensor}` feeds the `patch.<hook name>` inputs.
    Every input is checked against the graph (names, dtypes, ranks, sizes) before running.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[Any] | None = None,
        *,
        options: ort.SessionOptions | None = None,
        threads: int | None = None,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX file at {str(path)!r}")
        self.path = path
        self.session = ort.InferenceSession(
            str(path),
            sess_options=options or session_options(threads),
            providers=list(providers) if providers is not None else default_providers(),
        )
        self.inputs = {i.name: _spec(i) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_shapes = {o.name: tuple(o.shape) for o in self.session.get_outputs()}
        self.output_dtypes = {o.name: ORT_TYPES[o.type] for o in self.session.get_outputs()}
        self.metadata = read_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"

    @property
    def patch_names(self) -> list[str]:
        """Hook names this graph takes patches for."""
        return [n[len(PATCH_PREFIX) :] for n in self.inputs if n.startswith(PATCH_PREFIX)]

    def __repr__(self) -> str:
        return (
            f"OnnxRunner({str(self.path)!r}, providers={self.session.get_providers()}, "
            f"inputs={list(self.inputs)}, outputs={len(self.output_names)})"
        )

    def __call__(
        self,
        input: Array | None = None,
        decoder_input: Array | None = None,
        one_zero_attention_mask: Array | None = None,
        decoder_attention_mask: Array | None = None,
        patches: Mapping[str, Array] | None = None,
        **inputs: Array,
    ) -> dict[str, Any]:
        given = {
            "input": input,
            "decoder_input": decoder_input,
            "one_zero_attention_mask": one_zero_attention_mask,
            "decoder_attention_mask": decoder_attention_mask,
            **inputs,
        }
        feeds = {k: v for k, v in given.items() if v is not None}
        for name, value in (patches or {}).items():
            key = name if name.startswith(PATCH_PREFIX) else PATCH_PREFIX + name
            if key not in self.inputs:
                raise ValueError(
                    f"no patch input for {name!r}; this graph takes patches for "
                    f"{self.patch_names or 'nothing (exported without patch=...)'}"
                )
            if key in feeds:
                raise ValueError(f"patch {name!r} given twice (in patches= and as {key}=)")
            feeds[key] = value
        return self.run(feeds)

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Any]:
        """Run with graph input names as keys (checked, defaults filled); outputs by name."""
        feeds = self.check(feeds)
        if self.on_cuda and any(isinstance(v, torch.Tensor) and v.is_cuda for v in feeds.values()):
            return self._run_bound(feeds)
        arrays = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in feeds.items()}
        return dict(zip(self.output_names, self.session.run(self.output_names, arrays)))

    # ---- validation --------------------------------------------------------------------------
    def check(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        """Validated feeds in the graph's dtypes. Raises ValueError/TypeError saying what is wrong and valid."""
        unknown = [k for k in feeds if k not in self.inputs]
        if unknown:
            hints = {k: difflib.get_close_matches(k, list(self.inputs), n=1) for k in unknown}
            said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise ValueError(f"unknown input {said}; this graph's inputs: {self.describe_inputs()}")
        out = {k: _as_array(v, k) for k, v in feeds.items()}
        self._fill_defaults(out)
        missing = [n for n in self.inputs if n not in out]
        if missing:
            patches = [n[len(PATCH_PREFIX) :] for n in missing if n.startswith(PATCH_PREFIX)]
            others = [n for n in missing if not n.startswith(PATCH_PREFIX)]
            parts = []
            if patches:
                parts.append(
                    f"missing patches for {patches} (pass patches={{name: tensor}}; this graph was "
                    f"exported with patch inputs {self.patch_names})"
                )
            if others:
                parts.append(f"missing inputs {others}")
            raise ValueError("; ".join(parts) + f"; this graph's inputs: {self.describe_inputs()}")
        modes = self.metadata.get("patch_modes", {})
        for name in self.inputs:
            if name.startswith(PATCH_PREFIX) and modes.get(name[len(PATCH_PREFIX) :]) == "add":
                out[name] = _left_pad_rank(out[name], len(self.inputs[name].shape))
        sizes: dict[str, tuple[int, str]] = {}
        for name, spec in self.inputs.items():
            out[name] = self._check_one(spec, out[name], sizes)
        return out

    def describe_inputs(self) -> str:
        return "; ".join(spec.describe() for spec in self.inputs.values())

    def _fill_defaults(self, feeds: dict[str, Array]) -> None:
        config = self.metadata.get("config", {})
        if "decoder_input" in self.inputs and "decoder_input" not in feeds and "input" in feeds:
            start = int(config.get("decoder_start_token_id", 0))
            tokens = feeds["input"]
            feeds["decoder_input"] = _full_like(tokens, (tokens.shape[0], 1), start, np.int64)
        pad = int(config.get("pad_token_id", 0))
        for mask, tokens in DEFAULT_MASKS.items():
            if mask in self.inputs and mask not in feeds and tokens in feeds:
                feeds[mask] = _padding_mask(feeds[tokens], pad, decoder=tokens == "decoder_input")

    def _check_one(self, spec: InputSpec, value: Array, sizes: dict[str, tuple[int, str]]) -> Array:
        dtype = _dtype_of(value)
        if spec.dtype.kind in "iu":
            allowed = "iu" if spec.name in TOKEN_INPUTS else "iub"
            if dtype.kind not in allowed:
                what = "token ids" if spec.name in TOKEN_INPUTS else "0/1 (or bool)"
                raise TypeError(
                    f"{spec.name} must hold integer {what}, got dtype {dtype.name}; expected {spec.describe()}"
                )
        elif spec.dtype.kind == "f":
            if dtype.kind != "f":
                raise TypeError(f"{spec.name} must be floating point ({spec.dtype.name}), got dtype {dtype.name}")
        shape = tuple(value.shape)
        if spec.name in TOKEN_INPUTS and len(shape) == 2 and 0 in shape:  # refused as the eager model does
            raise ValueError(f"{spec.name} must have shape [batch, pos] with batch, pos >= 1, got {shape}")
        if len(shape) != len(spec.shape):
            raise ValueError(
                f"{spec.name} has rank {len(shape)} (shape {shape}); expected rank {len(spec.shape)}: {spec.describe()}"
            )
        for axis, (size, dim) in enumerate(zip(shape, spec.shape)):
            if isinstance(dim, int):
                if size != dim:
                    raise ValueError(
                        f"{spec.name} has size {size} on axis {axis}; the graph fixes it to {dim}: {spec.describe()}"
                    )
            elif isinstance(dim, str):
                if dim in sizes and sizes[dim][0] != size:
                    first_size, first_input = sizes[dim]
                    raise ValueError(
                        f"{spec.name} axis {axis} ({dim!r}) has size {size} but {first_input} has "
                        f"{dim!r} = {first_size}; inputs must agree on {dim!r}"
                    )
                sizes.setdefault(dim, (size, spec.name))
        if spec.name in TOKEN_INPUTS and int(np.prod(shape)) > 0:
            self._check_token_range(spec.name, value)
        return _cast(value, spec.dtype)

    def _check_token_range(self, name: str, value: Array) -> None:
        vocab = self.metadata.get("config", {}).get("d_vocab")
        if vocab is None:
            return
        low, high = int(value.min()), int(value.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"{name} has token ids in [{low}, {high}]; valid ids are 0..{vocab - 1}")

    # ---- CUDA with IOBinding -------------------------------------------------------------------
    def _run_bound(self, feeds: dict[str, Array]) -> dict[str, torch.Tensor]:
        """Bind torch CUDA tensors by pointer; outputs are preallocated torch CUDA tensors."""
        device = next(v.device for v in feeds.values() if isinstance(v, torch.Tensor) and v.is_cuda)
        binding = self.session.io_binding()
        keep = []  # contiguous copies must outlive the run
        sizes: dict[str, int] = {}
        for name, value in feeds.items():
            spec = self.inputs[name]
            tensor = torch.as_tensor(value).to(device=device, dtype=TORCH_DTYPES[spec.dtype]).contiguous()
            keep.append(tensor)
            for dim, size in zip(spec.shape, tensor.shape):
                if isinstance(dim, str):
                    sizes[dim] = size
            if tensor.numel() == 0:  # e.g. the empty KV cache of the first step: no buffer to point at
                empty = ort.OrtValue.ortvalue_from_shape_and_type(
                    tuple(tensor.shape), spec.dtype.type, "cuda", device.index or 0
                )
                keep.append(empty)
                binding.bind_ortvalue_input(name, empty)
                continue
            binding.bind_input(name, "cuda", device.index or 0, spec.dtype.type, tuple(tensor.shape), tensor.data_ptr())
        outputs: dict[str, torch.Tensor] = {}
        unresolved = []
        for name in self.output_names:
            shape = _resolve_shape(self.output_shapes[name], sizes)
            if shape is None:
                unresolved.append(name)
                binding.bind_output(name, "cuda", device.index or 0)
                continue
            tensor = torch.empty(shape, dtype=TORCH_DTYPES[self.output_dtypes[name]], device=device)
            outputs[name] = tensor
            binding.bind_output(
                name, "cuda", device.index or 0, self.output_dtypes[name].type, shape, tensor.data_ptr()
            )
        torch.cuda.current_stream(device).synchronize()  # inputs written by torch are ready for ORT's stream
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        if unresolved:  # shapes the graph does not spell in input axes: ORT allocated them on the device
            produced = dict(zip(self.output_names, binding.get_outputs()))
            for name in unresolved:
                outputs[name] = (
                    torch.from_dlpack(produced[name])
                    if hasattr(produced[name], "__dlpack__")
                    else torch.from_numpy(produced[name].numpy()).to(device)
                )
        return {name: outputs[name] for name in self.output_names}


def _spec(node: Any) -> InputSpec:
    if node.type not in ORT_TYPES:
        raise TypeError(f"graph input {node.name!r} has unsupported type {node.type}")
    shape = tuple(d if isinstance(d, (int, str)) else None for d in node.shape)
    return InputSpec(node.name, ORT_TYPES[node.type], shape)


def _as_array(value: Any, name: str) -> Array:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value
    if isinstance(value, (list, tuple, int, float, bool)):
        return np.asarray(value)
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")


def _left_pad_rank(value: Array, rank: int) -> Array:
    """An "add" patch of lower rank (a steering vector `[d_model]`) gets leading size-1 axes, which is
    exactly how it broadcasts against the activation."""
    missing = rank - len(value.shape)
    return value.reshape((1,) * missing + tuple(value.shape)) if missing > 0 else value


def _dtype_of(value: Array) -> np.dtype:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            return np.dtype("V2")  # kind "V": reported as not floating, with its name below
        return np.dtype(str(value.dtype).removeprefix("torch."))
    return value.dtype


def _cast(value: Array, dtype: np.dtype) -> Array:
    if isinstance(value, torch.Tensor):
        target = TORCH_DTYPES[dtype]
        return value if value.dtype == target else value.to(target)
    return np.ascontiguousarray(value, dtype=dtype)


def _padding_mask(tokens: Array, pad: int, decoder: bool) -> Array:
    """1 where the token is not the pad id (the decoder's leading start token always 1), as the eager model
    infers a missing mask (`HookedEncoderDecoder.infer_padding_mask`), in int64 on the tokens' side."""
    if isinstance(tokens, torch.Tensor):
        mask = (tokens != pad).to(torch.int64)
    else:
        mask = (np.asarray(tokens) != pad).astype(np.int64)
    if decoder:
        mask[:, 0] = 1
    return mask


def _full_like(reference: Array, shape: tuple[int, ...], fill: int, dtype: Any) -> Array:
    """A filled array on the reference's side (torch tensor on its device, or numpy)."""
    if isinstance(reference, torch.Tensor):
        return torch.full(shape, fill, dtype=TORCH_DTYPES[np.dtype(dtype)], device=reference.device)
    return np.full(shape, fill, dtype=dtype)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _resolve_shape(dims: tuple[Any, ...], sizes: Mapping[str, int]) -> tuple[int, ...] | None:
    """Output dims as ints from the input axis sizes: static ints, axis names, or simple arithmetic
    such as 'past + 1' (as the exporter writes them). None when some dim cannot be resolved."""

    def evaluate(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in sizes:
            return sizes[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](evaluate(node.left), evaluate(node.right))
        raise KeyError(ast.dump(node))

    out = []
    for dim in dims:
        if isinstance(dim, int):
            out.append(dim)
            continue
        if not isinstance(dim, str):
            return None
        try:
            out.append(evaluate(ast.parse(dim, mode="eval").body))
        except (KeyError, SyntaxError):
            return None
    return tuple(out)
