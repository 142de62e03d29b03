"""Quantised weights: which stored layouts t5hooks dequantises exactly, and the refusal of every other one.

A checkpoint tensor that is not a float weight is loaded only when its meaning is known. Supported
(each dequantised in fp32, then cast to the model's dtype):

* **fp8** (`float8_e4m3fn` / `float8_e5m2`) `<m>.weight` without a scale: a plain cast, `value = q`.
* **scaled** int8 or fp8 `<m>.weight` with a scale tensor `<m>.weight_scale` (compressed-tensors
  "int-quantized" / "naive-quantized" / "float-quantized", e.g. W8A16 and FP8 exports; FBGEMM fp8),
  `<m>.scale_weight` (ComfyUI's scaled fp8) or `<m>.weight_scale_inv` (block-wise fp8, as in transformers'
  fine-grained fp8), and an optional `<m>.weight_zero_point` (asymmetric int8): `value = (q - zero) * scale`.
  The scale is a scalar, one value per output row (`[out]` / `[out, 1]`), or a grid `[R, C]` with
  `out % R == 0` and `in % C == 0` that scales blocks of `out/R` rows by `in/C` columns (groups when R = out).
* **bitsandbytes LLM.int8** int8 `<m>.weight` with `<m>.SCB` (each row's absmax, `[out]`) and optionally
  `<m>.weight_format` (0: row-major): `value = q * SCB / 127`.
* **optimum-quanto** 8-bit `<m>.weight._data` (int8 or fp8) with `<m>.weight._scale` (`[out, 1]` or a scalar):
  `value = data * scale`.

Activation-quantisation scales (`input_scale`, `output_scale`, `scale_input`, ...) and ComfyUI's `scaled_fp8`
marker carry no weights: weights are dequantised, activations run in float. Anything else that is not a float
weight is refused before a byte of weights is read, naming the tensor: an integer weight without a scale, a
scale or zero point without its weight (or of the wrong shape), and the packed 2/4-bit layouts (GPTQ / AWQ
`qweight`, bitsandbytes 4-bit `absmax` / `quant_map`, compressed-tensors `weight_packed`, quanto `_shift`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from . import CheckpointError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
INT_DTYPES = (torch.int8,)  # 8-bit integer weights; wider ints are never weights
SCALE_SUFFIXES = ("weight_scale", "scale_weight", "weight_scale_inv")
ZERO_POINT_SUFFIX = "weight_zero_point"
BNB_SCALE, BNB_FORMAT = "SCB", "weight_format"
QUANTO_DATA, QUANTO_SCALE = "weight._data", "weight._scale"
# Scales of activations (static W8A8 / FP8 exports, quanto) and marker tensors: nothing to dequantise.
SKIPPED_SUFFIXES = ("input_scale", "scale_input", "output_scale", "input_zero_point", "output_zero_point")
MARKER_KEYS = ("scaled_fp8",)
# Tensor-name endings of layouts t5hooks does not dequantise, and what they are (for the error).
UNSUPPORTED = {
    "qweight": "GPTQ / AWQ packed 4-bit",
    "qzeros": "GPTQ / AWQ packed 4-bit",
    "scales": "GPTQ / AWQ packed 4-bit",
    "g_idx": "GPTQ act-order groups",
    "weight_g_idx": "compressed-tensors act-order groups",
    "weight_packed": "compressed-tensors packed 4-bit",
    "weight_shape": "compressed-tensors packed 4-bit",
    "weight_global_scale": "compressed-tensors NVFP4",
    "absmax": "bitsandbytes 4-bit (NF4 / FP4)",
    "quant_map": "bitsandbytes 4-bit (NF4 / FP4)",
    "nested_absmax": "bitsandbytes 4-bit (NF4 / FP4)",
    "nested_quant_map": "bitsandbytes 4-bit (NF4 / FP4)",
    "_shift": "optimum-quanto 2/4-bit",
    "CB": "bitsandbytes int8 in its internal (non-serialised) layout",
}
SUPPORTED = (
    "supported: float weights (fp32 / fp16 / bf16 / fp64); fp8 weights, plain or with a scale; int8 or fp8 "
    "weights with <m>.weight_scale / <m>.scale_weight / <m>.weight_scale_inv (scalar, per row or per block; "
    "optional <m>.weight_zero_point); bitsandbytes int8 (<m>.weight + <m>.SCB); optimum-quanto 8-bit "
    "(<m>.weight._data + <m>.weight._scale)"
)


@dataclass(frozen=True)
class QuantisedWeight:
    """How one stored tensor (`data`) becomes the float weight `name`."""

    name: str  # the weight as the model names it: `<m>.weight`
    data: str  # the stored tensor holding the quantised values
    scheme: str  # "fp8" | "scaled" | "bitsandbytes-int8" | "quanto"
    scale: str | None = None
    zero_point: str | None = None
    format_flag: str | None = None  # bitsandbytes `weight_format`: must be 0 (row-major)
    divisor: float = 1.0  # bitsandbytes: SCB is the absmax, so value = q * SCB / 127


@dataclass
class QuantisationPlan:
    """Every quantised weight of a checkpoint (keyed by its stored data tensor) and the auxiliary tensors that
    are read only to dequantise them, or skipped."""

    weights: dict[str, QuantisedWeight]
    auxiliary: set[str]

    def output_name(self, stored: str) -> str:
        q = self.weights.get(stored)
        return q.name if q is not None else stored


TensorInfo = tuple[torch.dtype, tuple[int, ...]]


def plan_quantisation(tensors: Mapping[str, TensorInfo], what: str, method: str | None = None) -> QuantisationPlan:
    """Decide, from names, dtypes and shapes alone (before anything is read), how every non-float tensor is
    dequantised; CheckpointError naming the tensor and the supported schemes for anything else. `method`:
    the config's `quantization_config.quant_method`, quoted in errors."""
    problems: list[str] = []
    weights: dict[str, QuantisedWeight] = {}
    auxiliary: set[str] = set()

    def need(name: str, dtype_ok: Callable[[torch.dtype], bool], label: str) -> None:
        if not dtype_ok(tensors[name][0]):
            problems.append(f"{name} is {_dtype_name(tensors[name][0])}, expected {label}")

    for name, (dtype, shape) in tensors.items():
        module = name.rpartition(".")[0]
        if name in MARKER_KEYS:
            auxiliary.add(name)
            continue
        if name.endswith("." + QUANTO_DATA):
            base = name.removesuffix("._data")
            scale = f"{base}._scale"
            weights[name] = QuantisedWeight(base, name, "quanto", scale if scale in tensors else None)
            if scale not in tensors:
                problems.append(f"{name} has no {scale}")
            elif dtype not in (*INT_DTYPES, *FP8_DTYPES):
                problems.append(f"{name} is {_dtype_name(dtype)}; quanto 8-bit data is int8 or fp8")
            else:
                auxiliary.add(scale)
                need(scale, _is_float, "a float scale")
                _check_scale_shape(problems, scale, tensors[scale][1], shape)
            continue
        if not name.endswith(".weight") or _is_float(dtype):
            continue
        found = [f"{module}.{s}" for s in SCALE_SUFFIXES if f"{module}.{s}" in tensors]
        bnb = f"{module}.{BNB_SCALE}"
        if len(found) > 1:
            problems.append(f"{name} has several scales ({', '.join(found)}); which one applies is ambiguous")
            auxiliary.update(found)
            continue
        if found:
            zero = f"{module}.{ZERO_POINT_SUFFIX}"
            zero = zero if zero in tensors else None
            if dtype not in (*INT_DTYPES, *FP8_DTYPES):
                problems.append(f"{name} is {_dtype_name(dtype)}; scaled weights are int8 or fp8")
                continue
            weights[name] = QuantisedWeight(name, name, "scaled", found[0], zero)
            auxiliary.update(x for x in (found[0], zero) if x)
            need(found[0], _is_float, "a float scale")
            scale_shape = _check_scale_shape(problems, found[0], tensors[found[0]][1], shape)
            if zero is not None:
                need(
                    zero,
                    lambda d: d in INT_DTYPES or d == torch.int32 or _is_float(d),
                    "an integer or float zero point",
                )
                if scale_shape is not None and _grid(tensors[zero][1], shape) != scale_shape:
                    problems.append(
                        f"{zero} has shape {list(tensors[zero][1])}, which does not match its scale "
                        f"{found[0]} {list(tensors[found[0]][1])}"
                    )
        elif bnb in tensors:
            flag = f"{module}.{BNB_FORMAT}"
            flag = flag if flag in tensors else None
            if dtype not in INT_DTYPES or len(shape) != 2:
                problems.append(
                    f"{name} is {_dtype_name(dtype)}{list(shape)}; bitsandbytes int8 weights are int8 matrices"
                )
                continue
            weights[name] = QuantisedWeight(name, name, "bitsandbytes-int8", bnb, format_flag=flag, divisor=127.0)
            auxiliary.update(x for x in (bnb, flag) if x)
            need(bnb, _is_float, "a float row absmax")
            if tuple(tensors[bnb][1]) not in ((shape[0],), (shape[0], 1)):
                problems.append(
                    f"{bnb} has shape {list(tensors[bnb][1])}; {name} {list(shape)} needs one per row [{shape[0]}]"
                )
        elif dtype in FP8_DTYPES:
            weights[name] = QuantisedWeight(name, name, "fp8")
        else:
            problems.append(
                f"{name} is {_dtype_name(dtype)} with no scale tensor (its integers cannot be read as weights)"
            )

    for name, (dtype, _) in tensors.items():
        if name in auxiliary or name in weights:
            continue
        module, _, suffix = name.rpartition(".")
        if suffix in SKIPPED_SUFFIXES:
            auxiliary.add(name)
            continue
        if suffix in (*SCALE_SUFFIXES, ZERO_POINT_SUFFIX, BNB_SCALE) and f"{module}.weight" in tensors:
            weight_dtype = _dtype_name(tensors[f"{module}.weight"][0])
            problems.append(f"{name} scales {module}.weight, which is stored as {weight_dtype}: ambiguous")
            continue
        unsupported = next(
            (label for end, label in UNSUPPORTED.items() if name == end or name.endswith("." + end)), None
        )
        if unsupported is not None:
            problems.append(f"{name} belongs to a {unsupported} layout, which t5hooks does not dequantise")
        elif _looks_like_quantisation(name):
            problems.append(f"{name} is a quantisation tensor with no weight it belongs to (unknown name or layout)")
        elif not dtype.is_floating_point:
            problems.append(f"{name} is {_dtype_name(dtype)}, not a float weight, and no known scheme explains it")

    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        declared = f" (config.json quantization_config: quant_method {method!r})" if method else ""
        raise CheckpointError(f"{what}{declared}: cannot load {'; '.join(problems[:3])}{more}. {SUPPORTED}")
    return QuantisationPlan(weights, auxiliary)


class RowDequantiser:
    """`value = (q - zero) * scale / divisor` for a weight viewed as `[rows, cols]`, computed a block of rows at a
    time in fp32 (the scale a scalar, `[rows]`, or an `[R, C]` grid of `rows/R x cols/C` blocks)."""

    def __init__(
        self,
        shape: tuple[int, ...],
        scale: Tensor | None = None,
        zero_point: Tensor | None = None,
        divisor: float = 1.0,
    ) -> None:
        self.rows = shape[0] if shape else 1
        self.cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        self.scale = None if scale is None else _as_grid(scale.float(), shape)
        self.zero = None if zero_point is None else _as_grid(zero_point.float(), shape)
        self.divisor = divisor

    def __call__(self, q: Tensor, begin: int, end: int, dtype: torch.dtype) -> Tensor:
        """Rows `begin:end` of the weight, `q` `[end - begin, cols]` as stored, returned in `dtype`."""
        out = q.float()
        if self.zero is not None:
            out.sub_(self._rows(self.zero, begin, end))
        if self.scale is not None:
            out.mul_(self._rows(self.scale, begin, end))
        if self.divisor != 1.0:
            out.div_(self.divisor)
        return out.to(dtype)

    def _rows(self, grid: Tensor, begin: int, end: int) -> Tensor:
        """The part of an `[R, C]` grid that covers rows `begin:end`, broadcastable to `[end - begin, cols]`."""
        r, c = grid.shape
        picked = grid[torch.arange(begin, end) // (self.rows // r)] if r > 1 else grid
        return picked.repeat_interleave(self.cols // c, dim=1) if c > 1 else picked


def dequantised(
    names: Iterable[str],
    plan: QuantisationPlan,
    dtype: torch.dtype | None,
    wanted: Callable[[str], bool] | None,
    read: Callable[[str, torch.dtype | None, RowDequantiser | None], Tensor],
    shape_of: Callable[[str], tuple[int, ...]],
    aux: Callable[[str], Tensor],
) -> Iterator[tuple[str, Tensor]]:
    """`(weight name, tensor)` for the stored tensors `names`, in order, as `plan` says: float tensors in `dtype`
    (None: as stored), quantised ones dequantised (to `dtype`, or fp32). `read(name, dtype, dequantiser)` reads one
    stored tensor; `aux(name)` one auxiliary tensor (scale, zero point, flag) from wherever it is stored.
    Auxiliary tensors are not yielded; nor, unread, the weights `wanted` rejects."""
    for name in names:
        if name in plan.auxiliary:
            continue
        q = plan.weights.get(name)
        out_name = name if q is None else q.name
        if wanted is not None and not wanted(out_name):
            continue
        if q is None:
            yield name, read(name, dtype, None)
            continue
        if q.format_flag is not None:
            flag = aux(q.format_flag)
            if flag.numel() != 1 or int(flag.reshape(())) != 0:
                raise CheckpointError(
                    f"{q.format_flag} = {flag.tolist()}: only bitsandbytes' row-major int8 layout (0) is supported"
                )
        scale = None if q.scale is None else aux(q.scale)
        zero = None if q.zero_point is None else aux(q.zero_point)
        dequantiser = RowDequantiser(shape_of(name), scale, zero, q.divisor)
        yield out_name, read(name, dtype or torch.float32, dequantiser)


def _check_scale_shape(
    problems: list[str], scale: str, scale_shape: tuple[int, ...], weight_shape: tuple[int, ...]
) -> tuple[int, int] | None:
    grid = _grid(scale_shape, weight_shape)
    if grid is None:
        rows = weight_shape[0] if weight_shape else 1
        problems.append(
            f"{scale} has shape {list(scale_shape)}, which does not fit its weight {list(weight_shape)} (expected a "
            f"scalar, one per row [{rows}] / [{rows}, 1], or an [R, C] grid dividing the weight evenly)"
        )
    return grid


def _grid(scale_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The `[R, C]` block grid a scale of `scale_shape` describes for a weight of `weight_shape`, or None."""
    rows = weight_shape[0] if weight_shape else 1
    cols = math.prod(weight_shape[1:]) if len(weight_shape) > 1 else 1
    dims = [d for d in scale_shape]
    if math.prod(dims) == 1:
        return (1, 1)
    if len(dims) == 1:
        return (rows, 1) if dims[0] == rows else None
    if len(dims) == 2 and len(weight_shape) == 2 and 0 < dims[0] and 0 < dims[1]:
        r, c = dims
        return (r, c) if rows % r == 0 and cols % c == 0 else None
    return None


def _as_grid(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    grid = _grid(tuple(t.shape), shape)
    if grid is None:  # the plan checked the header; a reader handing over another shape is a bug
        raise CheckpointError(f"a scale of shape {list(t.shape)} does not fit a weight of shape {list(shape)}")
    return t.reshape(grid)


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype not in FP8_DTYPES


def _looks_like_quantisation(name: str) -> bool:
    last = name.rsplit(".", 1)[-1].lower()
    return any(word in last for word in ("scale", "zero_point", "zeros", "absmax", "quant")) or last in ("scb", "_data")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
