"""The `t5hooks` command: the parser of every subcommand (commands/, demos/, bench/) and the one error boundary:
one line per failure, exit 2 for input errors, 1 for runtime failures."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence

from ..atomic import LockHeld, LockLost
from .common import CliError, CommandFailed

__all__ = ["build_parser", "main"]


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (what was wrong, where to see what is valid), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from .bench import register as register_bench
    from .commands import dashboard, export, extract, run, train, train_tiny, view
    from .demos import sae, tour

    parser = OneLineParser(prog="t5hooks", description="Hooked T5 encoder-decoders: look inside, run fast.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (run, tour, train_tiny, export, extract, train, dashboard, view, sae):
        module.register(sub)
    register_bench(sub)
    bench = sub.choices["bench"]
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


# Optional packages -> the extra of pyproject.toml that installs them (a missing one is named with its install line).
EXTRA_FOR_MODULE = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "onnx_ir": "onnx",
    "matplotlib": "plot",
    "datasets": "store",
    "pyarrow": "store",
    "gguf": "gguf",
    "triton": "gpu",
}


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
    except (CommandFailed, LockHeld, LockLost) as err:
        return _fail(args.command, one_line(err), 1, debug)
    except ModuleNotFoundError as err:
        extra = EXTRA_FOR_MODULE.get((err.name or "").split(".")[0])
        if extra is None:
            return _fail(args.command, f"ModuleNotFoundError: {one_line(err)}", 1, debug)
        return _fail(
            args.command,
            f"this needs the {extra!r} extra (no module named {err.name!r}): pip install 't5hooks[{extra}]'",
            1,
            debug,
        )
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
