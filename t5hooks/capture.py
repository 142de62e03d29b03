"""CaptureModule: a fixed set of hook points as explicit outputs (and patch inputs) of an ordinary forward.

Python hooks and `torch.compile(fullgraph=True)` do not mix. Here the captured and patched names
are fixed when the module is built, so to Dynamo, `torch.export` and the ONNX exporter they are
Python constants: the forward is plain tensor code that returns a dict. It runs the model's own
`encode` / `decode` (the same forward as eager runs) with a `HookIO` instead of hooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .components import lm_loss
from .hook_io import PATCH_MODES, HookIO, NameFilter
from .hook_registry import VARYING_AXES
from .kernels import cpu_gemm as gemm
from .padding import warn_if_right_padded

SEQUENCE_INPUTS = ("input", "decoder_input", "one_zero_attention_mask", "decoder_attention_mask", "labels")


@functools.cache
def _call_frame_runs_eagerly() -> Callable[..., None]:
    """`torch.compile(cap)` enters through `CaptureBase.__call__`: run that frame eagerly (it only marks dynamic
    axes and checks the padding) and compile what it calls; inlined into an outer compile or export it is traced as
    any other function. Returns the padding check wrapped to run eagerly with all it calls (a function called from
    the eager frame would otherwise be compiled on its own, and the check depends on the data).
    Done at the first capture module, not at import: `torch._dynamo` imports triton, which `import t5hooks` must not."""
    import torch._dynamo
    from torch._dynamo.eval_frame import skip_code

    skip_code(CaptureBase.__call__.__code__)
    return torch._dynamo.disable(warn_if_right_padded, recursive=True)


class CaptureBase(nn.Module):
    """Fixed capture and patch sets over a hooked model, shared by the encoder-decoder and encoder-only captures.

    Subclasses define `INPUT_NAMES` (their forward's tensor inputs, in order), `OUTPUT` (the model's main
    output) and a forward that runs the model with `self.hook_io(patches)` and returns `self.outputs(...)`.
    `intervene={name: module}` splices modules in (`apply_intervention`'s protocol: the module returns the
    replacement, or `(replacement, {output: tensor})`); the patch, if any, applies first; a captured name
    returns the module's replacement; side outputs follow the captured names as `"<name>.<output>"`.
    """

    INPUT_NAMES: tuple[str, ...] = ()
    OUTPUT = ""

    def __init__(
        self,
        model: nn.Module,
        names: NameFilter = (),
        patch: NameFilter = (),
        patch_mode: str | Mapping[str, str] = "replace",
        intervene: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self._check_padding = _call_frame_runs_eagerly()
        self.model = model  # registered as a submodule: the same parameters, not a copy
        self.names: tuple[str, ...] = tuple(model.resolve_names(names)) if _nonempty(names) else ()
        patch_names = tuple(model.resolve_names(patch)) if _nonempty(patch) else ()
        self.patch_modes: dict[str, str] = _patch_modes(patch_names, patch_mode)
        self._capture_set = frozenset(self.names)
        # registered submodules: their parameters train, move with .to() and export with the graph
        intervene_names, modules = _interventions(model, intervene)
        self.intervene_names: tuple[str, ...] = intervene_names
        self.interventions = nn.ModuleList(modules)
        self.regional = True  # under torch.compile each layer is one reused compile region (regions.py)
        # per patched name: (ndim, the axes that vary between batches), from the hook registry
        self._patch_axes: dict[str, tuple[int, tuple[int, ...]]] = {}
        for name in self.patch_modes:
            axes = model.layout.spec(name).axes
            if axes is not None:
                varying = tuple(i for i, axis in enumerate(axes) if axis in VARYING_AXES)
                self._patch_axes[name] = (len(axes), varying)

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Eagerly (outside any trace): mark the batch and sequence axes of the token and mask inputs and of
        the patches dynamic, each sequence with its own symbol, so a compiled capture serves every batch shape
        with one graph and never ties the encoder and decoder lengths (duck sizing would, when a first batch
        has E == D, and recompile at the next E != D); and warn about a right-padded-looking token batch given
        without a mask (the compiled forward cannot: the check depends on the data). This frame itself is never
        compiled (see `skip_code` above); inside an outer compile or export it is traced as usual."""
        if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            # no generators or helper functions here: their frames would be compiled on their own
            n = len(self.INPUT_NAMES)
            given = dict(zip(self.INPUT_NAMES, args))
            given.update({k: v for k, v in kwargs.items() if k in SEQUENCE_INPUTS})
            marks = []  # (tensor, axis)
            for value in given.values():
                for part in value if isinstance(value, tuple) else [value]:  # (tokens, mask) pairs
                    if isinstance(part, Tensor) and part.ndim == 2:  # [batch, pos]: both vary between batches
                        marks += [(part, 0), (part, 1)]
            patches = args[n] if len(args) > n else kwargs.get("patches")
            for name, value in (patches or {}).items():
                axes = self._patch_axes.get(name)  # the patch's batch / position axes
                if isinstance(value, Tensor) and axes is not None and value.ndim == axes[0]:
                    marks += [(value, axis) for axis in axes[1]]
            for value, axis in marks:
                if value.shape[axis] > 1:  # PyTorch specialises sizes 0 and 1 whatever is marked
                    torch._dynamo.maybe_mark_dynamic(value, axis)  # imported by _call_frame_runs_eagerly
            tokens = given.get("input")
            if isinstance(tokens, Tensor) and given.get("one_zero_attention_mask") is None:
                cfg = self.model.cfg
                self._check_padding(tokens, cfg.eos_token_id, cfg.pad_token_id)
        return super().__call__(*args, **kwargs)

    @property
    def patch_names(self) -> tuple[str, ...]:
        return tuple(self.patch_modes)

    @property
    def intervene(self) -> dict[str, nn.Module]:
        """`{hook name: module}` spliced into the forward."""
        return dict(zip(self.intervene_names, self.interventions))

    def extra_repr(self) -> str:
        return f"capture={len(self.names)} names, patch={self.patch_modes}, intervene={list(self.intervene_names)}"

    def hook_io(self, patches: Mapping[str, Any] | None) -> HookIO:
        """The `HookIO` one forward threads through the model: capture set, checked patches, interventions."""
        io = HookIO(self._capture_set, self.patch_modes, self._check_patches(patches), self.intervene)
        io.regional = self.regional
        return io

    def outputs(self, io: HookIO, main: dict[str, Tensor]) -> dict[str, Tensor]:
        """`main` (the model's outputs, in order), the captured names in hook order, then side outputs."""
        out = dict(main)
        for name in self.names:
            out[name] = io.outputs[name]
        for key, value in io.outputs.items():  # interventions' side outputs, in forward order
            if key not in self._capture_set:
                out[key] = value
        return out

    def _check_patches(self, patches: Mapping[str, Any] | None) -> dict[str, Tensor]:
        """The patches as tensors (numpy arrays and nested lists accepted), after checking the names."""
        given = set(patches or {})
        expected = set(self.patch_modes)
        if given != expected:
            missing, unknown = sorted(expected - given), sorted(given - expected)
            parts = []
            if missing:
                parts.append(f"missing patches for {missing}")
            if unknown:
                parts.append(
                    f"patches for {unknown} are not in this module's patch set {sorted(expected)} "
                    f"(fixed when it was built: model.capture(names, patch=...))"
                )
            raise ValueError("; ".join(parts))
        return {name: _as_patch_tensor(name, value) for name, value in (patches or {}).items()}


def _as_patch_tensor(name: str, value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    try:
        tensor = torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"patch for {name!r} must be a torch tensor or numpy array, got {type(value).__name__} ({err})"
        ) from None
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"patch for {name!r} must hold numbers, got dtype {tensor.dtype}")
    return tensor


def _interventions(model: nn.Module, intervene: Mapping[str, nn.Module] | None) -> tuple[tuple[str, ...], list]:
    """Exact hook names (in model order) and their modules; globs are refused (one module, one place)."""
    if not intervene:
        return (), []
    if not isinstance(intervene, Mapping):
        raise TypeError(f"intervene must be a dict {{hook name: nn.Module}}, got {type(intervene).__name__}")
    for name, module in intervene.items():
        if not isinstance(name, str) or name not in model.hook_dict:
            model.resolve_names([name])  # raises with close valid names when unknown
            raise ValueError(f"intervene keys must be exact hook names, not patterns: {name!r}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"intervene[{name!r}] must be an nn.Module, got {type(module).__name__}")
    names = tuple(n for n in model.hook_dict if n in intervene)
    return names, [intervene[n] for n in names]


class CaptureModule(CaptureBase):
    """`cap(input, decoder_input, ...) -> {"logits": ..., **captured}` sharing the model's parameters.

    Output order: "logits", then "loss" when `labels` are given, then the captured names in the
    model's hook order (`model.hook_dict` order, which follows the forward computation).
    `patches[name]` replaces the activation ("replace", same shape) or is added to it ("add",
    broadcastable, e.g. a steering vector `[d_model]`). A name both patched and captured returns the
    patched value, which is what the rest of the network sees. `intervene=` as in `CaptureBase`.
    """

    INPUT_NAMES = ("input", "decoder_input", "one_zero_attention_mask", "decoder_attention_mask")
    OUTPUT = "logits"

    def forward(
        self,
        input: Tensor,
        decoder_input: Tensor | None = None,
        one_zero_attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        patches: Mapping[str, Tensor] | None = None,
        labels: Tensor | None = None,
    ) -> dict[str, Tensor]:
        model = self.model
        tokens, mask, dec_tokens, dec_mask, labels = model.prepare_inputs(  # __call__ checked the padding
            input, decoder_input, one_zero_attention_mask, decoder_attention_mask, labels, warn_padding=False
        )
        io = self.hook_io(patches)
        logits = model.decode(dec_tokens, model.encode(tokens, mask, io), mask, dec_mask, io)
        main = {"logits": logits}
        if labels is not None:
            main["loss"] = lm_loss(logits, labels)
        return self.outputs(io, main)


class EncoderCaptureModule(CaptureBase):
    """`cap(input, one_zero_attention_mask, patches=...) -> {"last_hidden_state": ..., **captured}`: only the
    encoder stack runs (no decoder pass, no logits). Same capture / patch / intervene rules as `CaptureModule`.

    Works on any model built on `HookedT5Base`: a `HookedT5Encoder`, or a `HookedEncoderDecoder` whose capture
    set the encoder computes (`hook_embed`, `encoder.*`, `encoder_final_ln.*`, `hook_encoder_out`); bulk
    extraction of encoder activations (T5 text encoders) runs it, compiled.
    """

    INPUT_NAMES = ("input", "one_zero_attention_mask")
    OUTPUT = "last_hidden_state"

    def __init__(
        self,
        model: nn.Module,
        names: NameFilter = (),
        patch: NameFilter = (),
        patch_mode: str | Mapping[str, str] = "replace",
        intervene: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__(model, names, patch=patch, patch_mode=patch_mode, intervene=intervene)
        asked = (*self.names, *self.patch_names, *self.intervene_names)
        decoder_side = [n for n in asked if model.layout.spec(n).stack != "encoder"]
        if decoder_side:
            raise ValueError(f"{decoder_side} are computed by the decoder; capture them with model.capture(...)")

    def forward(
        self,
        input: Tensor,
        one_zero_attention_mask: Tensor | None = None,
        patches: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        tokens, mask = self.model.prepare_encoder_inputs(input, one_zero_attention_mask, warn_padding=False)
        io = self.hook_io(patches)
        return self.outputs(io, {"last_hidden_state": self.model.encode(tokens, mask, io)})  # [B,E,d_model]


def _nonempty(names: NameFilter) -> bool:
    return names is not None and (callable(names) or isinstance(names, str) or len(names) > 0)


def _patch_modes(patch_names: tuple[str, ...], patch_mode: str | Mapping[str, str]) -> dict[str, str]:
    """One mode for every patched name, or a per-name (or per-glob) mapping covering all of them."""
    if isinstance(patch_mode, str):
        if patch_mode not in PATCH_MODES:
            raise ValueError(f"patch_mode={patch_mode!r}; valid: {', '.join(PATCH_MODES)}")
        return {name: patch_mode for name in patch_names}
    modes: dict[str, str] = {}
    for pattern, mode in patch_mode.items():
        if mode not in PATCH_MODES:
            raise ValueError(f"patch_mode[{pattern!r}]={mode!r}; valid: {', '.join(PATCH_MODES)}")
        matched = [n for n in patch_names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(f"patch_mode key {pattern!r} matches nothing in the patch set {list(patch_names)}")
        for name in matched:
            modes[name] = mode
    unset = [n for n in patch_names if n not in modes]
    if unset:
        raise ValueError(f"patch_mode gives no mode for {unset}; valid modes: {', '.join(PATCH_MODES)}")
    return {name: modes[name] for name in patch_names}


def compile_capture(
    cap: CaptureBase,
    *,
    freeze: bool = False,
    max_autotune: bool = False,
    bf16: bool = False,
    dynamic: bool | None = None,
    regional: bool = True,
    cache: bool | str | os.PathLike = True,
    announce: bool = True,
    cpu_gemm: str | None = None,
    backend: str = "inductor",
) -> CompiledCapture:
    """`torch.compile(cap, fullgraph=True)` with regional compilation, warm starts and the CPU levers.

    `regional`: every layer is one nested compile region, compiled once per stack and reused (regions.py);
    False compiles the whole graph flat (slower to compile, same numbers). `cache`: load what an earlier
    process compiled for the same model, capture and levers on this machine, and save what this one compiles
    (`compile_cache`; True = the default directory, a path = that directory, False = off). `announce`: print
    what is being compiled and how long it is expected to take before the first call compiles.
    Batch and sequence axes are dynamic from the first call (no recompiles for new batch shapes; a size-1 axis
    is specialised by PyTorch and compiles once more).

    CPU levers (measured in `t5hooks bench cpu`): `freeze`: inductor freezing (weights become constants of
    the graph; with oneDNN weight prepacking on CPU); the compiled function runs under `torch.no_grad()` and
    does not see later changes to the weights (build a new one after training). `max_autotune`: inductor's
    GEMM templates, benchmarked at compile time (much slower to compile). `bf16`: bfloat16 autocast (a CPU
    with AVX512-BF16 or AMX runs its matmuls natively); outputs come back in float32 and differ from fp32 by
    bf16 rounding (~1e-2 relative, measured in benchmarks/RESULTS.md).
    `cpu_gemm`: the CPU GEMM backend of the linear layers for this compiled function ("auto" | "mkl" |
    "onednn" | "bf16", see kernels/cpu_gemm.py; None: the model's `cfg.cpu_gemm`, else the environment, else
    auto); in fp32 inference a backend other than MKL runs as the extern op `t5hooks::cpu_linear`.
    `backend`: the `torch.compile` backend (inductor; e.g. "aot_eager" to check a graph without generating code;
    the inductor levers above need inductor).
    """
    gemm.check_setting(cpu_gemm)
    if backend != "inductor" and (freeze or max_autotune):
        raise ValueError(f"freeze and max_autotune are inductor options; backend={backend!r}")
    options: dict[str, Any] = {}
    if freeze:
        options.update({"freezing": True, "cpp.weight_prepack": True})
    if max_autotune:
        options["max_autotune"] = True
    levers = {"freeze": freeze, "max_autotune": max_autotune, "bf16": bf16, "dynamic": dynamic, "regional": regional}
    levers.update(cpu_gemm=cpu_gemm, backend=backend)
    return CompiledCapture(cap, options, levers, cache, announce)


class CompiledCapture:
    """The callable `compile_capture` returns: `cap`'s signature and outputs, compiled at the first call.

    The first call of each kind (with or without gradients) loads the warm-start cache, announces the
    compile, compiles forward and backward together (so the announced time is the whole cost) and saves the
    artefacts. `compiled` is the underlying `torch.compile` module; `compile_seconds` the measured compile
    times (`{"training": s, "inference": s}`), `warm` which of them were loaded from the cache."""

    def __init__(
        self,
        cap: CaptureBase,
        options: dict[str, Any],
        levers: dict[str, Any],
        cache: bool | str | os.PathLike,
        announce: bool,
    ) -> None:
        cap.regional = levers["regional"]
        self.cap = cap
        self.levers = levers
        self.compiled = torch.compile(
            cap, fullgraph=True, dynamic=levers["dynamic"], backend=levers["backend"], options=options or None
        )
        self.device_type = next(cap.model.parameters()).device.type
        self.cache_root = None if cache is True or cache is False else cache
        self.use_cache = cache is not False
        self.announce = announce
        self.compile_seconds: dict[str, float] = {}
        self.warm: dict[str, bool] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        freeze, bf16 = self.levers["freeze"], self.levers["bf16"]
        with torch.no_grad() if freeze else contextlib.nullcontext(), gemm.use(self.levers["cpu_gemm"]):
            kind = "training" if torch.is_grad_enabled() else "inference"
            with self._first_compile(kind) if kind not in self.compile_seconds else contextlib.nullcontext():
                if not bf16:
                    return self.compiled(*args, **kwargs)
                with torch.autocast(self.device_type, dtype=torch.bfloat16):
                    out = self.compiled(*args, **kwargs)
                return {name: value.float() for name, value in out.items()}

    def cache_entry(self, kind: str) -> Any:
        """The `CompileCache` entry of this work (`kind`: "training" | "inference"), or None without a cache."""
        from .compile_cache import CompileCache

        return CompileCache(self.cache_key(kind), self.cache_root) if self.use_cache else None

    def expected_cost(self, kind: str) -> Any:
        """`compile_policy.CompileCost` of compiling this work here: measured when recorded, else the defaults."""
        from .compile_policy import expected_cost

        return expected_cost(self.cache_entry(kind), self.device_type, kind == "training")

    def cache_key(self, kind: str) -> dict[str, Any]:
        """What the compiled code depends on besides torch and the machine (those name the cache directory)."""
        cap = self.cap
        return {
            "what": f"{type(cap).__name__} {kind}",
            "config": dataclasses.asdict(cap.model.cfg),
            "model": type(cap.model).__name__,
            "device": self.device_type,
            "dtype": str(next(cap.model.parameters()).dtype),
            "capture": list(cap.names),
            "patch": cap.patch_modes,
            "intervene": {name: _module_signature(m) for name, m in cap.intervene.items()},
            "levers": self.levers,
        }

    @contextlib.contextmanager
    def _first_compile(self, kind: str) -> Iterator[None]:
        from .compile_policy import first_compile

        layers = "one region per stack" if self.levers["regional"] else "whole graph"
        what = f"the {type(self.cap).__name__} for {kind} ({layers}, {self.device_type})"
        with first_compile(what, self.cache_entry(kind), self.expected_cost(kind), show=self.announce) as done:
            yield
        self.compile_seconds[kind], self.warm[kind] = done["seconds"], done["warm"]


def _module_signature(module: nn.Module) -> str:
    """Class and parameter shapes of an intervention module (what its compiled code depends on)."""
    shapes = {name: list(p.shape) for name, p in module.named_parameters()}
    return f"{type(module).__module__}.{type(module).__qualname__} {shapes}"
