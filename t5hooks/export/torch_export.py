"""Capture modules as `torch.export` programs (`.pt2`) and, for older consumers, TorchScript.

`torch.export` is the path forward; TorchScript (`torch.jit.trace`) is deprecated upstream and kept
only for consumers that still load it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.export import Dim, ExportedProgram

from ..atomic import atomic_path
from ..capture import CaptureBase
from ..hook_io import NameFilter
from .axes import BATCH, DEC, ENC, INPUT_AXES, PAST, patch_axes


def as_capture(
    model: Any,
    capture: NameFilter = (),
    patch: NameFilter = (),
    patch_mode: Any = "replace",
    intervene: Mapping[str, Any] | None = None,
) -> CaptureBase:
    """A capture module given either a model (built here) or a ready capture module (returned as is)."""
    if isinstance(model, CaptureBase):
        if capture or patch or intervene:
            raise ValueError("pass capture/patch/intervene either to model.capture(...) or here, not both")
        return model
    return model.capture(capture, patch=patch, patch_mode=patch_mode, intervene=intervene)


def example_inputs(
    cap: CaptureBase, batch: int = 2, enc_len: int = 7, dec_len: int = 5, patches: Mapping[str, Tensor] | None = None
) -> tuple[Any, ...]:
    """Example `(*inputs, patches)` for tracing, inputs as `cap.INPUT_NAMES` (encoder-decoder: input,
    decoder_input, mask, decoder_mask; encoder: input, mask): in-range ids, all-ones masks, and zero patches
    ("replace": the activation's shape; "add": its shape with every varying axis 1)."""
    model = cap.model
    device = model.W_E.device
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, enc_len), generator=g).to(device)
    dec = torch.randint(0, model.cfg.d_vocab, (batch, dec_len), generator=g).to(device)
    pad = model.cfg.pad_token_id  # no pad ids: padding is what the masks say
    tokens, dec = (t.masked_fill(t == pad, (pad + 1) % model.cfg.d_vocab) for t in (tokens, dec))
    by_name = {
        "input": tokens,
        "decoder_input": dec,
        "one_zero_attention_mask": torch.ones(batch, enc_len, dtype=torch.long, device=device),
        "decoder_attention_mask": torch.ones(batch, dec_len, dtype=torch.long, device=device),
    }
    inputs = tuple(by_name[name] for name in cap.INPUT_NAMES)
    if patches is None and cap.patch_modes:
        shapes = activation_shapes(cap, inputs)
        patches = {}
        for name, mode in cap.patch_modes.items():
            shape = shapes[name]
            if mode == "add":
                shape = tuple(
                    1 if axis is not None else size
                    for axis, size in zip(patch_axes(name, "replace", shape, cap.model.layout), shape)
                )
            patches[name] = torch.zeros(shape, dtype=model.W_E.dtype, device=device)
    return (*inputs, dict(patches or {}))


def activation_shapes(cap: CaptureBase, inputs: tuple[Tensor, ...]) -> dict[str, tuple[int, ...]]:
    """Shapes of the patched activations for these inputs (one eager run, nothing patched)."""
    probe = type(cap)(cap.model, list(cap.patch_modes))  # the same kind of capture, nothing patched
    with torch.no_grad():
        out = probe(*inputs)
    return {name: tuple(out[name].shape) for name in cap.patch_modes}


def export_dims() -> dict[str, Dim]:
    """One `torch.export.Dim` per axis label of axes.py: batch, encoder, decoder >= 1; past (cached
    decoder positions in generation graphs) >= 0."""
    return {BATCH: Dim(BATCH, min=1), ENC: Dim(ENC, min=1), DEC: Dim(DEC, min=1), PAST: Dim(PAST, min=0)}


def axes_spec(axes: tuple, dims: Mapping[str, Dim]) -> dict[int, Dim]:
    """`{dim index: Dim}` for the varying axes of one tensor."""
    return {i: dims[a] for i, a in enumerate(axes) if a is not None}


def dynamic_shapes(cap: CaptureBase, patches: Mapping[str, Tensor]) -> tuple[Any, ...]:
    """`torch.export` dynamic-shape spec: batch, encoder and decoder lengths vary (each >= 1)."""
    dims = export_dims()
    inputs = tuple(axes_spec(INPUT_AXES[name], dims) for name in cap.INPUT_NAMES)
    patch_spec = {
        name: axes_spec(patch_axes(name, cap.patch_modes[name], tuple(t.shape), cap.model.layout), dims)
        for name, t in patches.items()
    }
    return (*inputs, patch_spec)


def to_exported_program(
    model: Any,
    capture: NameFilter = (),
    patch: NameFilter = (),
    patch_mode: Any = "replace",
    *,
    dynamic: bool = True,
    example: tuple[Any, ...] | None = None,
    intervene: Mapping[str, Any] | None = None,
) -> ExportedProgram:
    """`torch.export` a capture module. Inputs: (input, decoder_input, one_zero_attention_mask,
    decoder_attention_mask, patches dict), for an encoder (input, one_zero_attention_mask, patches dict);
    outputs: the capture module's dict (interventions' side outputs included). With `dynamic`, batch, encoder
    and decoder lengths may change at run time."""
    cap = as_capture(model, capture, patch, patch_mode, intervene).eval()
    args = example if example is not None else example_inputs(cap)
    shapes = dynamic_shapes(cap, args[len(cap.INPUT_NAMES)]) if dynamic else None
    return torch.export.export(cap, tuple(args), dynamic_shapes=shapes)


def save_exported(
    program: ExportedProgram,
    path: str | Path,
    *,
    verify: Callable[[Path], None] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write an exported program as `.pt2` (`torch.export.save`), atomically: the file is loaded back (and
    passed to `verify(temp_path)` when given) before it takes its final name, so a failed check or a kill
    leaves the previous file. `overwrite=False` refuses an existing `path`."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"exported programs are saved as .pt2 files, got {path.name!r}")
    with atomic_path(path, overwrite=overwrite) as tmp:
        torch.export.save(program, str(tmp))
        if verify is not None:
            verify(tmp)
        else:
            load_exported(tmp)
    return path


def load_exported(path: str | Path) -> ExportedProgram:
    """Read a `.pt2` file back; call `.module()(input, decoder_input, mask, decoder_mask, patches)` on it."""
    return torch.export.load(str(path))


def to_torchscript(
    model: Any,
    capture: NameFilter = (),
    patch: NameFilter = (),
    patch_mode: Any = "replace",
    *,
    example: tuple[Any, ...] | None = None,
) -> torch.jit.ScriptModule:
    """Trace a capture module to TorchScript (same inputs and dict output as `to_exported_program`; without
    patches the traced module takes only the first four).

    TorchScript is deprecated upstream; prefer `to_exported_program`. Torch's deprecation and
    tracer warnings about this known-good trace are silenced here.
    """
    cap = as_capture(model, capture, patch, patch_mode).eval()
    args = tuple(example if example is not None else example_inputs(cap))
    n = len(cap.INPUT_NAMES)
    if len(args) == n + 1 and not args[n]:  # the tracer cannot type an empty dict: without patches, trace inputs
        args = args[:n]
    with _quiet_jit():
        return torch.jit.trace(cap, args, strict=False, check_trace=False)


def save_torchscript(
    module: torch.jit.ScriptModule,
    path: str | Path,
    *,
    verify: Callable[[Path], None] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a TorchScript module atomically (loaded back, or `verify(temp_path)`, before the rename)."""
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        with _quiet_jit():
            torch.jit.save(module, str(tmp))
        if verify is not None:
            verify(tmp)
        else:
            load_torchscript(tmp)
    return path


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    with _quiet_jit():
        return torch.jit.load(str(path))


@contextmanager
def _quiet_jit() -> Iterator[None]:
    """Silence torch's TorchScript deprecation and tracer warnings (we know; the README says why)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield
