"""What every `t5hooks` subcommand shares: the usage-error type, the one model loader, device parsing and
the check that an output path can be written (done before any long work)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..atomic import check_writable
from ..dtypes import RUN_DTYPES, parse_dtype


class CliError(Exception):
    """A usage or input error: printed as one line, exit status 2."""


class CommandFailed(RuntimeError):
    """A command ran but did not achieve what was asked (a failed check, a missed target): its message is
    printed as one line, exit status 1."""


def resolve_device(spec: str | None) -> torch.device | None:
    """`--device` as a torch.device; CliError for an unknown name or a device this machine does not have."""
    if spec is None:
        return None
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise CliError(f"--device {spec!r} is not a device; valid: {', '.join(available_devices())}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {spec}: CUDA is not available here; valid: {', '.join(available_devices())}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CliError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CliError(f"--device {spec}: MPS is not available here; valid: {', '.join(available_devices())}")
    if device.type not in ("cpu", "cuda", "mps"):
        raise CliError(f"--device {spec}: unsupported device type; valid: {', '.join(available_devices())}")
    return device


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def load_model(
    name: str | None,
    device: str | None = None,
    dtype: str = "float32",
    subfolder: str | None = None,
    encoder_only: bool = False,
) -> Any:
    """The model for `--model` (default: the built-in tiny model) in eval mode, on `--device`, in `--dtype`:
    a HookedEncoderDecoder, or a HookedT5Encoder for an encoder-only checkpoint (a diffusion pipeline's text
    encoder) or with `encoder_only` (`--encoder-only`). `subfolder`: `--subfolder` (e.g. `text_encoder_2`).

    Bad devices and dtypes are CliErrors; load failures keep the library's message (ValueError,
    FileNotFoundError: exit 2), prefixed with the model name."""
    from ..encoder import HookedT5Encoder
    from ..loading import EncoderOnlyCheckpoint
    from ..model import HookedEncoderDecoder
    from ..pretrained import DEFAULT_MODEL

    try:
        torch_dtype = parse_dtype(dtype, allowed=RUN_DTYPES, what="--dtype")
    except ValueError as err:
        raise CliError(str(err)) from None
    torch_device = resolve_device(device)
    label = name or DEFAULT_MODEL
    kwargs: dict[str, Any] = {"device": torch_device, "dtype": torch_dtype}
    if subfolder:
        kwargs["subfolder"] = subfolder
    try:
        if not encoder_only:
            try:
                return HookedEncoderDecoder.from_pretrained(label, **kwargs).eval()
            except EncoderOnlyCheckpoint:
                pass  # a text encoder: load it as one
        model = HookedT5Encoder.from_pretrained(label, **kwargs)
    except (OSError, ValueError) as err:
        raise _with_prefix(err, f"could not load model {label!r}") from err
    return model.eval()


def _with_prefix(err: Exception, prefix: str) -> Exception:
    """The same kind of error (so the exit status stays), its message prefixed."""
    message = f"{prefix}: {err}"
    try:
        return type(err)(message)
    except Exception:
        return ValueError(message) if isinstance(err, ValueError) else OSError(message)


def check_output(path: str | Path, *, force: bool, option: str = "--out") -> Path:
    """`path` can be written (see `atomic.check_writable`); an existing file needs `--force`."""
    path = Path(path)
    try:
        return check_writable(path, overwrite=force)
    except FileExistsError:
        raise FileExistsError(f"{option} {path} already exists; pass --force to replace it") from None
    except OSError as err:
        raise type(err)(f"{option}: {err}") from None


def finite_nonnegative(value: float | None, option: str) -> float | None:
    if value is not None and (not math.isfinite(value) or value < 0):
        raise CliError(f"{option} must be a finite number >= 0, got {value}")
    return value


def add_model_arguments(parser: Any, what: str = "runs") -> None:
    """`--model`, `--subfolder`, `--encoder-only`: the model options every model-loading command shares
    (`what`: what the command does with an encoder-only checkpoint, e.g. "exports")."""
    parser.add_argument(
        "--model",
        default=None,
        help="hub name, local directory, .safetensors/.gguf file or built-in name (default: the built-in tiny "
        f"model); an encoder-only checkpoint (a diffusion pipeline's text encoder) {what} the encoder alone",
    )
    parser.add_argument(
        "--subfolder", default=None, help="model folder inside --model, e.g. text_encoder_2 of a diffusers pipeline"
    )
    parser.add_argument(
        "--encoder-only", action="store_true", help=f"{what} only the encoder of an encoder-decoder checkpoint"
    )


@contextlib.contextmanager
def process_group(device: str | None = None) -> Iterator[tuple[int, int]]:
    """Under torchrun (WORLD_SIZE > 1): join the process group for the duration (nccl when `device` is CUDA,
    gloo otherwise) and yield `(rank, world_size)`; outside torchrun yield `(0, 1)`."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        yield 0, 1
        return
    started = not dist.is_initialized()
    if started:
        cuda = device is not None and str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        if started:
            dist.destroy_process_group()
