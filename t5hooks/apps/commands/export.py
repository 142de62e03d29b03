"""`t5hooks export`: write an ONNX / torch.export / TorchScript file and check it against eager.

After writing, the file is loaded back and run (ONNX in ONNX Runtime) on a fresh input with
shapes other than the export example (padding, random patches); success is reported only when
logits and every captured activation match the eager capture module. Exit status: 0 on success,
1 when the exported file disagrees with eager, 2 for bad arguments (unknown hook names, bad paths).

`register(subparsers)` adds the subcommand to the `t5hooks` parser. The file is written under a
temporary name beside `--out` and renamed only after the check passes: a failed check, an error or
a kill leaves the previous file as it was. An existing `--out` needs `--force`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...dtypes import EXPORT_DTYPES, cli_dtype
from ...hook_io import PATCH_MODES
from ..common import CliError, CommandFailed, add_model_arguments, check_output, finite_nonnegative, load_model

FORMATS = ("onnx", "pt2", "torchscript")
SUFFIXES = {"onnx": (".onnx",), "pt2": (".pt2",), "torchscript": (".pt", ".ts", ".torchscript")}
# Max |exported - eager| allowed: absolute + relative to the largest |eager| value of that output.
TOLERANCE = {"float32": (1e-4, 1e-4), "float16": (2e-2, 2e-2)}
# An int8 graph is judged by how often its logits pick the same token as eager's.
MIN_INT8_AGREEMENT = 0.9


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `export` to a `parser.add_subparsers()` object; returns the new subparser."""
    parser = subparsers.add_parser(
        "export",
        help="export a model whose captured activations are graph outputs (onnx, pt2, torchscript), "
        "checked against eager",
        description="Export a model with the chosen hook points as named outputs (and patch inputs), load the file "
        "back, and check it against eager PyTorch on a fresh input (other shapes, padding, random "
        "patches); the file is renamed to --out only when it passes. Exit status 0 on success, 1 on a mismatch "
        "(the previous file is kept), 2 on bad arguments.",
    )
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="file format (default: %(default)s)")
    parser.add_argument(
        "--capture",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="hook names or globs to return as outputs, e.g. 'encoder.*.hook_resid_post'",
    )
    parser.add_argument(
        "--patch", nargs="+", default=[], metavar="PATTERN", help="hook names or globs that get a patch input"
    )
    parser.add_argument(
        "--patch-mode",
        choices=PATCH_MODES,
        default="replace",
        help="'replace' the activation or 'add' to it (default: %(default)s)",
    )
    add_model_arguments(parser, "exports")  # an encoder graph outputs last_hidden_state
    parser.add_argument(
        "--out", required=True, metavar="PATH", help="output file: .onnx, .pt2, or .pt/.ts for torchscript"
    )
    parser.add_argument(
        "--dtype", type=cli_dtype(EXPORT_DTYPES), default="float32", help="exported weights (default: %(default)s)"
    )
    parser.add_argument(
        "--static",
        action="store_true",
        help="fix all shapes to the example's (default: dynamic batch, encoder and decoder lengths)",
    )
    parser.add_argument(
        "--atol", type=float, default=None, help="override the absolute tolerance of the check (finite, >= 0)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    parser.add_argument(
        "--optimize",
        action="store_true",
        help="onnx: fuse RMSNorm and GELU with ONNX Runtime's transformer optimiser (named outputs kept, checked)",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="onnx: int8 weight matmuls (dynamic quantisation; opt-in, changes the numbers: checked by the share of "
        f"positions whose logits pick eager's token, >= {MIN_INT8_AGREEMENT * 100:.0f}%%, instead of a tolerance)",
    )
    parser.set_defaults(func=run_export)
    return parser


class VerificationError(CommandFailed):
    """The exported file disagrees with eager (exit status 1); the previous file at --out is kept."""


def run_export(args: argparse.Namespace) -> int:
    """The `export` handler. Bad arguments raise CliError / ValueError / OSError (exit 2); a file that fails
    its check raises VerificationError (exit 1) and is never moved to --out."""
    out = Path(args.out)
    finite_nonnegative(args.atol, "--atol")
    if (args.optimize or args.quantize) and args.format != "onnx":
        raise CliError(f"--optimize and --quantize apply to --format onnx, not {args.format}")
    suffixes = SUFFIXES[args.format]
    if out.suffix not in suffixes:
        raise CliError(f"--out {str(out)!r}: {args.format} files end in {' or '.join(suffixes)}")
    if not out.parent.is_dir():
        raise CliError(f"--out {str(out)!r}: directory {str(out.parent)!r} does not exist")
    check_output(out, force=args.force)
    model = load_model(args.model, subfolder=args.subfolder, encoder_only=args.encoder_only)
    capture = model.resolve_names(args.capture) if args.capture else []  # unknown names fail here, before exporting
    patch = model.resolve_names(args.patch) if args.patch else []
    cap = model.capture(capture, patch=patch, patch_mode=args.patch_mode).eval()
    if args.quantize and cap.OUTPUT != "logits":
        raise CliError(
            f"--quantize is checked by greedy-token agreement of the logits; this model's graph outputs {cap.OUTPUT} "
            "(encoder-only): export it with --optimize, without --quantize"
        )

    from ...export.onnx import model_in_dtype

    exported_model = model_in_dtype(model, args.dtype)
    target = exported_model.capture(capture, patch=patch, patch_mode=args.patch_mode).eval()
    print(
        f"exporting {model.cfg.model_name} as {args.format} ({args.dtype}): {cap.OUTPUT} + {len(capture)} captured, "
        f"{len(patch)} patched ({args.patch_mode}) -> {out}"
    )
    inputs, patches = _fresh_inputs(cap, static=args.static)
    with torch.no_grad():
        expected = {k: v.float().numpy() for k, v in cap(*inputs.values(), patches=patches).items()}
    atol, rtol = TOLERANCE[args.dtype]
    if args.atol is not None:
        atol = args.atol
    B, E = inputs["input"].shape
    shapes = f"batch {B}, encoder {E}" + (
        f", decoder {inputs['decoder_input'].shape[1]}" if "decoder_input" in inputs else ""
    )
    backend = "ONNX Runtime" if args.format == "onnx" else f"loaded {args.format}"
    worst: list[float] = []
    agreement: list[float] = []

    def verify(written: Path) -> None:
        """Runs on the temporary file, before it is renamed to --out."""
        run = _load_written(args.format, written, target)
        got = {k: np.asarray(v, dtype=np.float32) for k, v in run(inputs, patches).items()}
        report = compare_int8(expected, got) if args.quantize else compare(expected, got, atol, rtol)
        if report:
            kept = f"the previous {out} is kept" if out.exists() else f"{out} was not written"
            raise VerificationError(
                f"{backend} disagrees with eager on a fresh input ({shapes}): "
                + "; ".join(line.strip() for line in report)
                + f"; {kept}"
            )
        worst.append(max(float(np.abs(got[k] - expected[k]).max()) for k in expected))
        if args.quantize:
            agreement.append(float((got["logits"].argmax(-1) == expected["logits"].argmax(-1)).mean()))

    levers = {"optimize": args.optimize, "quantize": args.quantize} if args.format == "onnx" else {}
    _write(args.format, target, out, dynamic=not args.static, verify=verify, overwrite=args.force, **levers)
    patched = f"{len(patch)} random patches" if patch else "no patches"
    print(
        f"ok: {backend} matches eager on a fresh input ({shapes}, padded, {patched}): "
        f"{len(expected)} outputs, max |diff| {worst[0]:.2e}"
        + (f", int8 logits pick eager's token at {agreement[0]:.1%} of positions" if args.quantize else "")
    )
    print(f"wrote {out}")
    return 0


def compare(expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], atol: float, rtol: float) -> list[str]:
    """One line per disagreement (missing/extra/reordered outputs, shapes, values); empty when all match."""
    if list(got) != list(expected):
        return [f"outputs {list(got)} != expected {list(expected)}"]
    lines = []
    for name, want in expected.items():
        have = got[name]
        if have.shape != want.shape:
            lines.append(f"  {name}: shape {have.shape} != eager {want.shape}")
            continue
        diff = float(np.abs(have - want).max()) if want.size else 0.0
        limit = atol + rtol * (float(np.abs(want).max()) if want.size else 0.0)
        if not np.isfinite(have).all() or diff > limit:
            lines.append(f"  {name}: max |diff| {diff:.3e} > tolerance {limit:.3e}")
    return lines


def compare_int8(expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> list[str]:
    """An int8 graph: same outputs and shapes, finite, and its logits' argmax agrees with eager's on at least
    MIN_INT8_AGREEMENT of the positions. Empty when it passes."""
    if list(got) != list(expected):
        return [f"outputs {list(got)} != expected {list(expected)}"]
    lines = [f"  {n}: shape {got[n].shape} != eager {w.shape}" for n, w in expected.items() if got[n].shape != w.shape]
    lines += [f"  {n}: not finite" for n in expected if not np.isfinite(got[n]).all()]
    if not lines:
        share = float((got["logits"].argmax(-1) == expected["logits"].argmax(-1)).mean())
        if share < MIN_INT8_AGREEMENT:
            lines.append(f"  logits: argmax agrees on {share:.1%} of positions < {MIN_INT8_AGREEMENT:.0%}")
    return lines


def _write(fmt: str, cap: Any, out: Path, *, dynamic: bool, verify: Any, overwrite: bool, **levers: Any) -> None:
    """Export `cap` to a temporary file beside `out`, run `verify(temp)`, then rename it to `out`.
    `levers`: `to_onnx`'s `optimize` / `quantize` (ONNX only)."""
    if fmt == "onnx":
        from ...export.onnx import to_onnx

        to_onnx(cap, out, dynamic=dynamic, verify=verify, overwrite=overwrite, **levers)
    elif fmt == "pt2":
        from ...export.torch_export import save_exported, to_exported_program

        save_exported(to_exported_program(cap, dynamic=dynamic), out, verify=verify, overwrite=overwrite)
    else:
        from ...export.torch_export import save_torchscript, to_torchscript

        save_torchscript(to_torchscript(cap), out, verify=verify, overwrite=overwrite)


def _load_written(fmt: str, path: Path, cap: Any) -> Any:
    """A callable `(inputs by graph input name, patches) -> dict of numpy` running the file as loaded from
    disk."""
    if fmt == "onnx":
        from ...export.ort import OnnxRunner

        runner = OnnxRunner(path)
        return lambda inputs, patches: runner(**inputs, patches=patches)
    if fmt == "pt2":
        from ...export.torch_export import load_exported

        module = load_exported(path).module()
    else:
        from ...export.torch_export import load_torchscript

        module = load_torchscript(path)
    dtype = cap.model.W_E.dtype

    def run(inputs: dict[str, Tensor], patches: dict[str, Tensor]) -> dict[str, Any]:
        args = tuple(inputs.values())
        if patches or fmt == "pt2":  # a TorchScript trace without patches takes only the tensor inputs
            args = (*args, {k: v.to(dtype) for k, v in patches.items()})
        with torch.no_grad():
            out = module(*args)
        return {k: v.float().numpy() for k, v in out.items()}

    return run


def _fresh_inputs(cap: Any, static: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Inputs (by graph input name, in `cap.INPUT_NAMES` order) other than the export example's: batch 3,
    encoder 11, decoder 4 (the example's shapes when static), the last row padded; random patches of full rank
    (an "add" patch broadcasts over positions)."""
    from ...export.torch_export import activation_shapes, example_inputs

    B, E, D = (2, 7, 5) if static else (3, 11, 4)
    cfg = cap.model.cfg
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, cfg.d_vocab, (B, E), generator=g)
    dec = torch.randint(0, cfg.d_vocab, (B, D), generator=g)
    mask = torch.ones(B, E, dtype=torch.long)
    dec_mask = torch.ones(B, D, dtype=torch.long)
    mask[-1, E // 2 :] = 0
    dec_mask[-1, D // 2 + 1 :] = 0
    every = {"input": tokens, "decoder_input": dec, "one_zero_attention_mask": mask, "decoder_attention_mask": dec_mask}
    inputs = {name: every[name] for name in cap.INPUT_NAMES}
    patches = {}
    if cap.patch_modes:
        shapes = activation_shapes(cap, tuple(inputs.values()))
        reference = example_inputs(cap)[len(cap.INPUT_NAMES)]
        for name, mode in cap.patch_modes.items():
            shape = shapes[name] if mode == "replace" else tuple(reference[name].shape)
            patches[name] = torch.randn(shape, generator=g, dtype=torch.float32)
    return inputs, patches
