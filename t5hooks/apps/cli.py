"""The `t5hooks` command: run a model and summarise its activations (and more subcommands as they land)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .common import CliError, CommandFailed, check_output, load_model

__all__ = ["CliError", "build_parser", "load_model", "main"]


def parse_tokens(text: str, what: str) -> torch.Tensor:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError as err:
        raise CliError(f"--{what} must be space- or comma-separated integers, got {text!r}") from err
    if not ids:
        raise CliError(f"--{what} is empty")
    return torch.tensor([ids])


def cmd_run(args: argparse.Namespace) -> int:
    from ..analysis.summary import activation_table, strongest_attention_links, top_predictions
    from ..encoder import HookedT5Encoder

    if args.save:
        check_output(args.save, force=args.force, option="--save")
    model = load_model(args.model, args.device, args.dtype, subfolder=args.subfolder, encoder_only=args.encoder_only)
    encoder_only = isinstance(model, HookedT5Encoder)
    label = model.cfg.model_name
    from ..pretrained import describe

    print(f"model: {label} — {describe(label)}")
    layers = f"{model.cfg.n_layers} encoder layers" + (
        "" if encoder_only else f" + {model.cfg.n_decoder_layers} decoder layers"
    )
    print(f"       {layers}, d_model {model.cfg.d_model}, {model.cfg.n_heads} heads, vocab {model.cfg.d_vocab}")
    if args.tokens is not None:
        tokens = parse_tokens(args.tokens, "tokens")
    else:
        if model.tokenizer is None:
            raise CliError("this model has no tokenizer: pass --tokens '1 2 3'")
        tokens = model.to_tokens(args.text, move_to_device=False)
    if encoder_only and (args.decoder_tokens is not None or args.decoder_text is not None):
        raise CliError("this is an encoder-only model: it takes no --decoder-text / --decoder-tokens")
    if args.decoder_tokens is not None:
        dec = parse_tokens(args.decoder_tokens, "decoder-tokens")
    elif args.decoder_text is not None:
        if model.tokenizer is None:
            raise CliError("this model has no tokenizer: pass --decoder-tokens")
        dec = model.to_decoder_tokens(args.decoder_text, move_to_device=False)  # start token, text, no EOS
    else:
        dec = torch.full((1, 1), model.cfg.decoder_start_token_id)
    names = model.resolve_names(args.capture) if args.capture else None  # validates patterns early
    with torch.inference_mode():
        if encoder_only:
            hidden, cache = model.run_with_cache(tokens, names_filter=names)
        else:
            logits, cache = model.run_with_cache(tokens, dec, names_filter=names)

    def str_tokens(t: torch.Tensor) -> list[str]:
        if model.tokenizer is None:
            return [str(i) for i in t[0].tolist()]
        return model.to_str_tokens(t[0])

    enc_toks, dec_toks = str_tokens(tokens), str_tokens(dec)
    print(f"input:   {len(enc_toks)} tokens {''.join(enc_toks) if model.tokenizer else enc_toks}")
    if not encoder_only:
        print(f"decoder: {len(dec_toks)} tokens {dec_toks}")
    print(
        f"cached:  {len(cache)} activations, {sum(t.numel() * t.element_size() for t in cache.values()) / 1e6:.2f} MB\n"
    )
    default_show = ["hook_embed", "*.hook_resid_post", "hook_encoder_out"] + (
        [] if encoder_only else ["unembed.hook_in"]
    )
    show = args.show or default_show
    print(activation_table(cache, show))
    if any(n.endswith("hook_pattern") for n in cache):
        print("\nstrongest attention links")
        print(
            strongest_attention_links(
                cache,
                {"encoder": enc_toks, "decoder": dec_toks},
                {"encoder": enc_toks, "decoder": dec_toks},
                k=args.top_links,
            )
        )
    if encoder_only:
        norms = ", ".join(f"{v:.2f}" for v in hidden[0].norm(dim=-1).tolist())
        print(f"\nlast hidden state {list(hidden.shape)} (what a diffusion pipeline conditions on); norms: {norms}")
    else:
        decode = (lambda i: model.to_str_tokens([i])[0]) if model.tokenizer is not None else str
        print("\nnext-token predictions")
        print(top_predictions(logits, decode))
    if args.save:
        save_activations(dict(cache.items()), args.save, overwrite=args.force)
        print(f"\nsaved {len(cache)} activations to {args.save}")
    return 0


def save_activations(tensors: dict[str, torch.Tensor], path: str, *, overwrite: bool = True) -> None:
    """Activations as safetensors, atomically. Hook points often share memory (`decoder.0.hook_resid_post` is
    `decoder.1.hook_resid_pre`; q/k/v can be views of one projection), which safetensors refuses: every
    tensor that shares its storage or does not own it whole is written as its own copy."""
    from safetensors.torch import load_file, save_file

    from ..atomic import atomic_path

    owners: dict[int, int] = {}
    for t in tensors.values():
        key = t.untyped_storage().data_ptr()
        owners[key] = owners.get(key, 0) + 1
    out = {}
    for name, t in tensors.items():
        t = t.detach()
        whole = t.is_contiguous() and t.storage_offset() == 0 and t.nbytes == t.untyped_storage().nbytes()
        shared = owners[t.untyped_storage().data_ptr()] > 1
        out[name] = t.clone(memory_format=torch.contiguous_format) if shared or not whole else t
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file({k: v.cpu() for k, v in out.items()}, str(tmp))
        if sorted(load_file(str(tmp))) != sorted(out):
            raise RuntimeError(f"{path}: the written file does not hold the {len(out)} activations")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "attention":
        from ..kernels.bench import main as bench_attention

        return bench_attention(args.rest)
    if args.what == "cpu":
        from .bench_cpu import main as bench_cpu

        return bench_cpu(args.rest)
    if args.what == "extract":
        from .bench_extract import main as bench_extract

        return bench_extract(args.rest)
    if args.what == "sae":
        from .bench_sae import run as bench_sae

        return bench_sae(args.rest)
    from .bench_model import main as bench_model

    return bench_model(args.rest)


def cmd_train_tiny(args: argparse.Namespace) -> int:
    import math

    from .train_tiny import train_tiny

    if args.steps < 1 or args.batch_size < 1:
        raise CliError(f"--steps and --batch-size must be >= 1, got {args.steps} and {args.batch_size}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise CliError(f"--lr must be a finite number > 0, got {args.lr}")
    if not 0 <= args.min_accuracy <= 1:
        raise CliError(f"--min-accuracy must be in [0, 1], got {args.min_accuracy}")
    if args.out:
        if not str(args.out).endswith(".safetensors"):
            raise CliError(f"--out {args.out!r}: the weights are written as a .safetensors file")
        check_output(args.out, force=args.force)  # before training, not after
    _, accuracy = train_tiny(
        out=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        compile=not args.no_compile,
        min_accuracy=args.min_accuracy,
        overwrite=args.force,
    )
    if accuracy < args.min_accuracy:
        kept = f"; {args.out} not written" if args.out else ""
        raise CommandFailed(f"held-out accuracy {accuracy:.2%} is below --min-accuracy {args.min_accuracy:.2%}{kept}")
    print(f"wrote {args.out}" if args.out else "(not saved: pass --out FILE.safetensors)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out, word=args.word)


def register_extract_command(sub: Any) -> None:
    from .extract_command import register

    register(sub)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (what was wrong, where to see what is valid), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="t5hooks", description="Hooked T5 encoder-decoders: look inside, run fast.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a model with the cache and summarise its activations",
        description="Run one input through a model with every (or the chosen) hook point cached, "
        "and print shapes, norms, the strongest attention links and predictions.",
    )
    run.add_argument(
        "--model",
        default=None,
        help="hub name, local directory, .safetensors/.gguf file or built-in name (default: built-in tiny model); "
        "an encoder-only checkpoint (a diffusion pipeline's text encoder) runs the encoder",
    )
    run.add_argument(
        "--subfolder", default=None, help="model folder inside --model, e.g. text_encoder_2 of a diffusers pipeline"
    )
    run.add_argument(
        "--encoder-only", action="store_true", help="run only the encoder of an encoder-decoder checkpoint"
    )
    src = run.add_mutually_exclusive_group()
    src.add_argument("--text", default="hooked", help="input text (default: %(default)r)")
    src.add_argument("--tokens", default=None, help="input token ids instead of text, e.g. '5 6 7 1'")
    dsrc = run.add_mutually_exclusive_group()
    dsrc.add_argument("--decoder-text", default=None, help="decoder prefix text (default: just the start token)")
    dsrc.add_argument("--decoder-tokens", default=None, help="decoder input token ids (start token included)")
    run.add_argument(
        "--capture", nargs="+", default=None, metavar="PATTERN", help="hook names or globs to cache (default: all)"
    )
    run.add_argument(
        "--show",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="which cached names to tabulate (default: residual stream)",
    )
    run.add_argument("--top-links", type=int, default=8, help="attention links to list (default: %(default)s)")
    run.add_argument("--save", default=None, metavar="FILE.safetensors", help="save the cached activations")
    run.add_argument("--force", action="store_true", help="replace an existing --save file")
    run.add_argument("--device", default=None, help="cpu, cuda, ...")
    run.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser(
        "demo",
        help="a guided tour on the embedded model (offline)",
        description="Load the embedded t5hooks-tiny model, answer an example, show its cross-attention "
        "alignment (PNG + ASCII), find the most important head by ablation, export ONNX "
        "with captured activations and check ONNX Runtime parity, then time it all.",
    )
    demo.add_argument("--out", default="t5hooks-demo", help="folder for the PNG and ONNX files (default: %(default)s)")
    demo.add_argument("--word", default="interpret", help="lowercase word to reverse (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser(
        "train-tiny",
        help="train the embedded tiny model (string reversal, a few minutes on CPU)",
        description="Train t5hooks-tiny from scratch with a torch.compile'd capture module; reports "
        "held-out exact-match accuracy. Exit status 1 if it is below --min-accuracy.",
    )
    train.add_argument(
        "--out",
        default=None,
        metavar="FILE.safetensors",
        help="where to write the weights (checked before training; written only if --min-accuracy is reached)",
    )
    train.add_argument("--force", action="store_true", help="replace an existing --out file")
    train.add_argument("--steps", type=int, default=1200)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-compile", action="store_true", help="train eagerly (no torch.compile)")
    train.add_argument("--min-accuracy", type=float, default=0.99, help="in [0, 1] (default: %(default)s)")
    train.set_defaults(func=cmd_train_tiny)

    from .export_command import register as register_export
    from .sae_demo import register as register_sae_demo
    from .train_command import register as register_train

    register_export(sub)
    register_extract_command(sub)
    register_train(sub)
    register_sae_demo(sub)

    bench = sub.add_parser(
        "bench",
        help="benchmarks: 'attention' (kernels side by side), 'model' (whole model vs HF), "
        "'cpu' (every CPU fast path vs HF, with GEMM GFLOP/s), "
        "'extract' (corpus extraction vs a hand-rolled HF hook loop), 'sae' (SAE training vs SAELens)",
        description="Run a benchmark; arguments after the benchmark name go to it (try `t5hooks bench attention --help`).",
    )
    bench.add_argument("what", choices=["attention", "model", "cpu", "extract", "sae"], help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(func=cmd_bench)
    for subparser in sub.choices.values():  # `t5hooks run --debug ...` as well as `t5hooks --debug run ...`
        if subparser is not bench:  # bench passes its arguments on
            subparser.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of a failure"
            )
    return parser


# Errors that mean "what you asked for is wrong or cannot be done as asked": exit status 2. Everything
# else is a runtime failure: exit status 1.
INPUT_ERRORS = (
    CliError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Every failure is one line on stderr (`--debug`: with the traceback); exit status
    2 for usage and input errors, 1 for runtime failures, 130 when interrupted, 143 on SIGTERM (temporary
    files are removed on the way out; finished files are never half-written)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        with _sigterm_as_exit():
            return args.func(args)
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted; nothing half-written was left under a final name", 130, debug)
    except SystemExit as exit_:
        if exit_.code == 143:
            return _fail(args.command, "terminated; nothing half-written was left under a final name", 143, debug)
        raise
    except INPUT_ERRORS as err:
        return _fail(args.command, one_line(err), 2, debug)
    except CommandFailed as err:
        return _fail(args.command, one_line(err), 1, debug)
    except Exception as err:
        return _fail(args.command, f"{type(err).__name__}: {one_line(err)}", 1, debug)


def one_line(err: BaseException, limit: int = 2000) -> str:
    """An exception's message on one line (library and torch messages can span several)."""
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(command: str, message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    hint = "" if debug or code == 2 else " (run with --debug for the traceback)"
    print(f"t5hooks {command}: error: {message}{hint}", file=sys.stderr)
    return code


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C (so atomic writes remove their temporary files), then exits 143."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):  # noqa: ARG001
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
