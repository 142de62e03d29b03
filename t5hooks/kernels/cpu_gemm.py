"""The CPU GEMM backend of every linear layer: torch's default (MKL), oneDNN, or bf16, chosen by measurement.

On some x86 CPUs (AMD EPYC, where MKL takes a slow code path) oneDNN runs the model's fp32 GEMMs ~2x faster
than `F.linear`; on others MKL is fastest. So `linear(x, weight)` picks per machine and per shape class, by a
one-off micro-benchmark at first use:

* kernels: `"mkl"` (`F.linear`: MKL on x86), `"onednn"` (`torch.ops.mkldnn._linear_pointwise` on the weight as
  it is, reordered per call), `"onednn_packed"` (the same on a weight reordered once into oneDNN's blocked
  layout and cached), `"bf16"` (inputs and weight rounded to bfloat16, oneDNN where the CPU supports it; the
  output is cast back: it changes numbers, so it is only ever an explicit choice).
* shape classes: `"decode"` (at most `DECODE_MAX_ROWS` rows, e.g. one generation step) and `"prefill"`
  (more rows), benchmarked separately for each weight shape `[N, K]` (a few to a few tens of ms each, once per
  process; with `T5HOOKS_CPU_GEMM_CACHE=<file.json>` also on disk, keyed by CPU model, torch version and thread
  count). `auto` leaves torch's default unless another kernel is at least `MARGIN` faster.
* settings (`SETTINGS`): `"auto"` (measure), `"mkl"` (always torch's default), `"onednn"` (always oneDNN,
  packed while the pack cache has room), `"bf16"`. Who decides, first match wins: `use(setting)` (a context
  manager; `compile_capture(..., cpu_gemm=)` uses it), the model's `cfg.cpu_gemm`, the environment variable
  `T5HOOKS_CPU_GEMM`, else `"auto"`.

Only fp32 CPU GEMMs go through a backend: `linear` is plain `F.linear` under autocast, while `torch.export` or
the TorchScript tracer runs (exported graphs keep standard ops), under a dispatch mode, for tensor subclasses
(fake, functional, functorch-wrapped) and for other dtypes. Where autograd records the linear (grad enabled and
the input or the weight requires grad) `auto` and `bf16` run `F.linear` (auto measures inference GEMMs only);
with `"onednn"` the forward runs oneDNN (never packed for a weight that requires grad: it changes every step)
and the backward torch's own matmuls (dx = dy W, dW = dy^T x), as `F.linear`'s does. A frozen model (no
parameter requires grad, nor the input) counts as inference even with grad enabled.
Under `torch.compile` the backend is the op `torch.ops.t5hooks.cpu_linear` (an extern kernel to inductor, with
a fake implementation, so `fullgraph=True` holds), emitted only where the setting, or `auto`'s measurement for
that weight shape, leaves MKL; the op reads the shape class at run time, so one dynamic graph serves every
batch and length.

Packed weights are cached per parameter and rebuilt when the parameter changes: an in-place update
(optimizer step, `load_state_dict`, `copy_` under no_grad: the version counter moves), new data (`.to()`,
`param.data = ...`: another storage) or a new parameter (`fold_ln`). An in-place edit through `param.data`
(`p.data.mul_(...)`) bypasses the version counter and is NOT seen: call `clear_cache()` after one. The cache
holds at most `T5HOOKS_CPU_GEMM_PACK_MB` MiB (default: a quarter of physical memory); weights beyond it run
oneDNN unpacked.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

ENV = "T5HOOKS_CPU_GEMM"
CACHE_ENV = "T5HOOKS_CPU_GEMM_CACHE"
PACK_LIMIT_ENV = "T5HOOKS_CPU_GEMM_PACK_MB"
SETTINGS = ("auto", "mkl", "onednn", "bf16")
AUTO_KERNELS = ("mkl", "onednn", "onednn_packed")  # what auto chooses among (fp32 only: never bf16)
SHAPE_CLASSES = ("decode", "prefill")
DECODE_MAX_ROWS = 32  # rows (= tokens) of a GEMM in the decode class; more rows: prefill
MARGIN = 1.10  # auto moves off torch's default (and onto packing) only for a gain at least this large
# Micro-benchmark size per shape class: rows, and the most weight elements used (the weight's first rows).
BENCH_ROWS = {"decode": 8, "prefill": 128}
BENCH_WEIGHT_ELEMENTS = {"decode": 1 << 21, "prefill": 1 << 19}
BENCH_ROUNDS = 5


def check_setting(setting: str | None, what: str = "cpu_gemm") -> None:
    """Raise ValueError unless `setting` is None or one of `SETTINGS`."""
    if setting is not None and setting not in SETTINGS:
        raise ValueError(f"{what}={setting!r}; valid: {', '.join(SETTINGS)} (or None: the environment, else auto)")


# ---- who decides ---------------------------------------------------------------------------------

# Set by `use()`. A module global on purpose: torch.compile guards on it, so a graph traced under one
# setting is not reused under another (a thread-local would be invisible to the guards).
_SCOPE: str | None = None


@contextlib.contextmanager
def use(setting: str | None) -> Iterator[None]:
    """Run the block with `setting` for every linear layer (over the models' `cfg.cpu_gemm` and the environment);
    None changes nothing. Process-wide while the block runs (not per thread)."""
    global _SCOPE
    check_setting(setting)
    if setting is None:
        yield
        return
    previous, _SCOPE = _SCOPE, setting
    try:
        yield
    finally:
        _SCOPE = previous


def resolve_setting(model_setting: str | None = None) -> str:
    """The setting in force: `use()`'s, else `model_setting` (the model's `cfg.cpu_gemm`), else the environment
    variable `T5HOOKS_CPU_GEMM`, else "auto". Raises ValueError for an invalid environment value."""
    if _SCOPE is not None:
        return _SCOPE
    if model_setting is not None:
        return model_setting
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return "auto"
    check_setting(value, ENV)
    return value


# ---- the entry point -------------------------------------------------------------------------------


def linear(x: Tensor, weight: Tensor, setting: str | None = None) -> Tensor:
    """`F.linear(x, weight)`: `[..., K] x [N, K] -> [..., N]`, run by the CPU backend in force (see the module
    docstring); `setting` is the model's `cfg.cpu_gemm` (None: the environment, else auto)."""
    if torch.compiler.is_exporting() or torch.jit.is_tracing():
        return F.linear(x, weight)
    if torch.compiler.is_compiling():
        if not _traceable(x, weight):
            return F.linear(x, weight)
        chosen = _traced_setting(_SCOPE, setting, weight.shape[1], weight.shape[0])
        trained = _needs_autograd(x, weight) and weight.requires_grad
        if chosen == "mkl" or (chosen in _INFERENCE_ONLY and _needs_autograd(x, weight)):
            return F.linear(x, weight)
        return torch.ops.t5hooks.cpu_linear(x, weight, chosen, not trained)
    if not _eligible(x, weight):
        return F.linear(x, weight)
    chosen = resolve_setting(setting)
    if chosen == "mkl":
        return F.linear(x, weight)
    if _needs_autograd(x, weight):  # the op's registered backward: torch's own matmuls
        if chosen in _INFERENCE_ONLY:
            return F.linear(x, weight)
        return torch.ops.t5hooks.cpu_linear(x, weight, chosen, not weight.requires_grad)
    return _run(x, weight, chosen)


# Settings that leave autograd-recorded linears to torch's default: bf16 (it changes numbers) and auto (its
# micro-benchmark times inference GEMMs; a loaded-machine training step ran slower with oneDNN's forward, see
# benchmarks/RESULTS.md, so training keeps MKL unless "onednn" is asked for).
_INFERENCE_ONLY = ("bf16", "auto")


def _traceable(x: Tensor, weight: Tensor) -> bool:
    """Inside torch.compile: the conditions of `_eligible` that the compiler can see (it guards on them)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and x.dim() >= 2
        and not torch.is_autocast_enabled("cpu")
    )


def _eligible(x: Tensor, weight: Tensor) -> bool:
    """Eager: plain fp32 CPU tensors, no autocast, no dispatch mode, shapes F.linear accepts.
    (Cheapest tests first: this runs before every linear layer.)"""
    return (
        x.dtype is _FP32
        and weight.dtype is _FP32
        and type(x) is Tensor
        and (type(weight) is Tensor or type(weight) is _Parameter)
        and x.is_cpu
        and weight.is_cpu
        and weight.ndim == 2
        and x.ndim >= 2
        and x.shape[-1] == weight.shape[1]
        and x.numel() > 0
        and weight.numel() > 0
        and not _functorch_wrapped(x)
        and not _functorch_wrapped(weight)
        and _dispatch_modes() == 0
        and not _any_autocast()
    )


_FP32 = torch.float32
_Parameter = torch.nn.Parameter
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_dispatch_modes = torch._C._len_torch_dispatch_stack
_any_autocast = torch._C._is_any_autocast_enabled


def _needs_autograd(x: Tensor, weight: Tensor) -> bool:
    """Would autograd record this linear? (grad enabled and the input or the weight requires grad)"""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def _traced_setting(scope: str | None, model_setting: str | None, k: int, n: int) -> str:
    """What a traced linear with weight `[n, k]` emits: "mkl" (plain `aten.linear`, so inductor's own GEMM
    handling, freezing's packing included, applies) when auto keeps torch's default in both shape classes,
    else the setting for `t5hooks::cpu_linear`. The compiler calls it as a black box and keeps the result as
    a constant (so the benchmark runs on real tensors); it guards on `scope` (the global `_SCOPE`, read by the
    traced caller) and on the model's config, not on the environment, which is read when a graph is traced."""
    setting = scope or resolve_setting(model_setting)
    if setting != "auto":
        return setting
    if all(choose(shape_class, k, n) == "mkl" for shape_class in SHAPE_CLASSES):
        return "mkl"
    return "auto"


# What `torch.compiler.assume_constant_result` does, without importing torch._dynamo (and triton) at import time.
_traced_setting._dynamo_marked_constant = True  # type: ignore[attr-defined]


def shape_class(rows: int) -> str:
    """ "decode" for at most `DECODE_MAX_ROWS` rows, else "prefill"."""
    return "decode" if rows <= DECODE_MAX_ROWS else "prefill"


def _run(x: Tensor, weight: Tensor, setting: str, pack: bool = True) -> Tensor:
    """One linear by the kernel `setting` calls for (auto: measured for this shape class and weight shape).
    `pack=False` for a weight being trained (it changes every step): oneDNN on the weight as it is."""
    n, k = weight.shape
    if setting == "bf16":
        return _bf16_linear(x, weight)
    if setting == "auto":
        kernel = choose(shape_class(x.numel() // k), k, n)
        if kernel == "mkl":
            return F.linear(x, weight)
    else:  # "onednn": packed while the cache has room
        kernel = "onednn_packed"
    if kernel == "onednn_packed" and pack:
        packed = packed_weight(weight, "fp32")
        if packed is not None:
            return _onednn(x, packed)
    return _onednn(x, weight.contiguous())


def _onednn(x: Tensor, weight: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def _bf16_linear(x: Tensor, weight: Tensor) -> Tensor:
    """bf16 inputs and weight (the weight rounded once and cached), fp32 accumulation, output in x's dtype."""
    if not native_bf16():
        _warn_once(
            "bf16",
            "cpu_gemm='bf16' on a CPU without native bf16 GEMMs (AVX512-BF16, AMX or AVX-NE-CONVERT): torch "
            "emulates them, far slower than fp32. Use 'auto' or 'onednn' here.",
        )
    packed = packed_weight(weight, "bf16")
    w = packed if packed is not None else weight.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    out = _onednn(xb, w) if native_bf16() else F.linear(xb, w)
    return out.to(x.dtype)


def _cpu_linear_impl(x: Tensor, weight: Tensor, setting: str, pack: bool) -> Tensor:
    """`torch.ops.t5hooks.cpu_linear`: `linear` inside a compiled graph (one extern call; the shape class is read
    from `x` at run time) and wherever autograd records it."""
    if not _eligible(x, weight):  # e.g. an empty batch
        return F.linear(x, weight)
    return _run(x, weight, setting, pack)


def _cpu_linear_fake(x: Tensor, weight: Tensor, setting: str, pack: bool) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# Defined with torch.library.Library rather than custom_op: the dispatcher then calls the implementation
# directly, several times cheaper per call (it runs once per linear layer in a compiled graph).
_LIB = torch.library.Library("t5hooks", "FRAGMENT")
_LIB.define(
    "cpu_linear(Tensor x, Tensor weight, str setting, bool pack) -> Tensor", tags=(torch.Tag.pt2_compliant_tag,)
)
_LIB.impl("cpu_linear", _cpu_linear_impl, "CPU")
torch.library.register_fake("t5hooks::cpu_linear", _cpu_linear_fake, lib=_LIB)


def _save_inputs(ctx: object, inputs: tuple[Tensor, Tensor, str, bool], output: Tensor) -> None:
    x, weight, _, _ = inputs
    ctx.save_for_backward(x, weight)  # type: ignore[attr-defined]


def _linear_backward(ctx: object, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
    """F.linear's backward, by torch's own matmuls: `dx = dy W` `[..., K]`, `dW = dy^T x` `[N, K]`."""
    x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
    needs = ctx.needs_input_grad  # type: ignore[attr-defined]
    dx = grad @ weight if needs[0] else None
    dw = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]) if needs[1] else None
    return dx, dw, None, None


torch.library.register_autograd("t5hooks::cpu_linear", _linear_backward, setup_context=_save_inputs, lib=_LIB)


# ---- the measurement ------------------------------------------------------------------------------

_CHOICES: dict[tuple[str, int, int, int], str] = {}
_TIMINGS: dict[tuple[str, int, int, int], dict[str, float]] = {}
_LOCK = threading.RLock()
_DISK: dict[str, str] | None = None  # the disk cache's entries for this machine (loaded once)


def choose(shape_class: str, k: int, n: int) -> str:
    """The fp32 kernel auto runs for `shape_class` GEMMs on a weight `[n, k]` at the current thread count:
    "mkl", "onednn" or "onednn_packed". Measured at the first call (a few ms), then cached."""
    if shape_class not in SHAPE_CLASSES:
        raise ValueError(f"shape_class={shape_class!r}; valid: {', '.join(SHAPE_CLASSES)}")
    key = (shape_class, int(k), int(n), torch.get_num_threads())
    found = _CHOICES.get(key)
    if found is not None:
        return found
    with _LOCK:
        if key in _CHOICES:
            return _CHOICES[key]
        disk = _disk_entries()
        name = _disk_key(key)
        if disk.get(name) in AUTO_KERNELS:
            _CHOICES[key] = disk[name]
            return disk[name]
        if not torch.backends.mkldnn.is_available():
            choice = "mkl"
        else:
            timings = measure(shape_class, k, n)
            _TIMINGS[key] = timings
            choice = pick(timings)
        _CHOICES[key] = choice
        _save_disk(name, choice)
        return choice


def pick(seconds: dict[str, float]) -> str:
    """From `{kernel: seconds}`: torch's default unless a oneDNN kernel is `MARGIN` faster. Among the oneDNN
    kernels the packed one (the same GEMM without reordering the weight at every call), unless the plain one
    is `MARGIN` faster: a smaller difference is the noise of a busy machine."""
    onednn = "onednn" if seconds["onednn"] * MARGIN <= seconds["onednn_packed"] else "onednn_packed"
    return onednn if seconds[onednn] * MARGIN <= seconds["mkl"] else "mkl"


def measure(shape_class: str, k: int, n: int, rounds: int = BENCH_ROUNDS) -> dict[str, float]:
    """Best-of-`rounds` seconds of each fp32 kernel on a representative GEMM of `shape_class` for a weight
    `[n, k]` (`BENCH_ROWS` rows; at most `BENCH_WEIGHT_ELEMENTS` of the weight), timed round-robin so the
    load of other processes falls on every kernel alike."""
    rows = BENCH_ROWS[shape_class]
    n_used = max(1, min(n, BENCH_WEIGHT_ELEMENTS[shape_class] // max(k, 1)))
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.no_grad():
        x = torch.randn(rows, k, generator=g)
        w = torch.randn(n_used, k, generator=g) * k**-0.5
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        kernels: dict[str, Callable[[], Tensor]] = {
            "mkl": lambda: F.linear(x, w),
            "onednn": lambda: _onednn(x, w),
            "onednn_packed": lambda: _onednn(x, packed),
        }
        best = dict.fromkeys(kernels, math.inf)
        for fn in kernels.values():
            fn()
        for _ in range(rounds):
            for name, fn in kernels.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def choices() -> dict[str, str]:
    """What auto has chosen so far in this process: `{"<class> [N,K] threads=T": kernel}`."""
    return {f"{c} [{n},{k}] threads={t}": v for (c, k, n, t), v in sorted(_CHOICES.items())}


def timings() -> dict[str, dict[str, float]]:
    """The micro-benchmark's best seconds per kernel for each choice measured in this process (not the ones
    read from the disk cache)."""
    return {f"{c} [{n},{k}] threads={t}": dict(v) for (c, k, n, t), v in sorted(_TIMINGS.items())}


# ---- disk cache ---------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine_key() -> str:
    return f"{cpu_model()} | torch {torch.__version__}"


def _disk_key(key: tuple[str, int, int, int]) -> str:
    shape_class, k, n, threads = key
    return f"{shape_class} [{n},{k}] threads={threads}"


def _disk_path() -> Path | None:
    value = os.environ.get(CACHE_ENV, "").strip()
    return Path(value).expanduser() if value else None


def _disk_entries() -> dict[str, str]:
    global _DISK
    if _DISK is None:
        _DISK = {}
        path = _disk_path()
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
                entries = data.get(_machine_key(), {}) if isinstance(data, dict) else {}
                _DISK = {str(a): str(b) for a, b in entries.items()} if isinstance(entries, dict) else {}
            except (OSError, ValueError) as err:
                _warn_once("disk", f"{CACHE_ENV}={path}: unreadable ({err}); measuring again and rewriting it")
    return _DISK


def _save_disk(name: str, choice: str) -> None:
    path = _disk_path()
    if path is None:
        return
    _disk_entries()[name] = choice
    from ..atomic import atomic_path  # a leaf module; imported here because only the disk cache writes

    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[_machine_key()] = dict(sorted(_disk_entries().items()))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    except OSError as err:
        _warn_once("disk-write", f"{CACHE_ENV}={path}: not written ({err}); choices stay in this process only")


# ---- packed weights -------------------------------------------------------------------------------


@dataclass
class _Packed:
    weight: weakref.ref  # the parameter it was packed from
    storage: StorageWeakRef  # that parameter's storage when packed (expired: the data was replaced)
    data_ptr: int
    version: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    tensor: Tensor
    nbytes: int


_PACKED: dict[tuple[int, str], _Packed] = {}
_packed_bytes = 0


def pack_limit_bytes() -> int:
    """`T5HOOKS_CPU_GEMM_PACK_MB` MiB, default a quarter of physical memory (1 GiB when unknown)."""
    value = os.environ.get(PACK_LIMIT_ENV, "").strip()
    if value:
        try:
            return int(float(value) * (1 << 20))
        except ValueError:
            raise ValueError(f"{PACK_LIMIT_ENV}={value!r}: expected a number of MiB (0 turns packing off)") from None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def packed_weight(weight: Tensor, kind: str) -> Tensor | None:
    """`weight` `[N, K]` reordered for oneDNN ("fp32") or rounded to bfloat16 (and reordered where the CPU
    allows, "bf16"), cached and rebuilt when the weight changes; None when it cannot be tracked (an inference
    tensor) or the cache is full."""
    global _packed_bytes
    if weight.is_inference():  # no version counter: an in-place change could not be seen
        return None
    key = (id(weight), kind)
    entry = _PACKED.get(key)
    if entry is not None and _current(entry, weight):
        return entry.tensor
    with _LOCK:  # a miss: (re)pack once, with consistent byte accounting
        entry = _PACKED.get(key)
        if entry is not None:
            if _current(entry, weight):
                return entry.tensor
            _drop(key)
        nbytes = weight.numel() * (4 if kind == "fp32" else 2)
        if _packed_bytes + nbytes > pack_limit_bytes():
            _warn_once(
                "pack-limit",
                f"cpu_gemm: packed weights would exceed {PACK_LIMIT_ENV}={pack_limit_bytes() >> 20} MiB; further "
                "weights run oneDNN unpacked (raise the limit for full speed)",
            )
            return None
        with torch.inference_mode(False), torch.no_grad():
            source = weight.detach()
            if kind == "bf16":
                source = source.to(torch.bfloat16)
                tensor = torch.ops.mkldnn._reorder_linear_weight(source, None) if native_bf16() else source
            else:
                tensor = torch.ops.mkldnn._reorder_linear_weight(source.contiguous(), None)
        _PACKED[key] = _Packed(
            weight=weakref.ref(weight, lambda _, key=key: _drop(key)),
            storage=StorageWeakRef(weight.untyped_storage()),
            data_ptr=weight.data_ptr(),
            version=weight._version,
            shape=tuple(weight.shape),
            stride=weight.stride(),
            tensor=tensor,
            nbytes=nbytes,
        )
        _packed_bytes += nbytes
        return tensor


def _current(entry: _Packed, weight: Tensor) -> bool:
    """Was `entry` packed from `weight` as it is now? (same object, storage, place, version, shape)"""
    return (
        entry.weight() is weight
        and entry.version == weight._version
        and entry.data_ptr == weight.data_ptr()
        and not entry.storage.expired()
        and entry.shape == tuple(weight.shape)
        and entry.stride == weight.stride()
    )


def _drop(key: tuple[int, str]) -> None:
    global _packed_bytes
    with _LOCK:
        entry = _PACKED.pop(key, None)
        if entry is not None:
            _packed_bytes -= entry.nbytes


def packed_bytes() -> int:
    """Bytes of packed weights held now."""
    return _packed_bytes


def clear_cache(choices: bool = False) -> None:
    """Drop every packed weight (after editing weights in place through `param.data`); with `choices`, also
    forget auto's measurements (the disk cache is left as it is)."""
    for key in list(_PACKED):
        _drop(key)
    if choices:
        _CHOICES.clear()
        _TIMINGS.clear()


# ---- the machine ----------------------------------------------------------------------------------


def native_bf16() -> bool:
    """Does oneDNN run bf16 GEMMs natively on this CPU (AVX512-BF16 / AMX / AVX-NE-CONVERT)?"""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


_WARNED: set[str] = set()


def _warn_once(topic: str, message: str) -> None:
    if topic not in _WARNED:
        _WARNED.add(topic)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
