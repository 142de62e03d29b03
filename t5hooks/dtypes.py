"""The one string -> dtype parser: every dtype a user names, for models, loaders, exports, the store and the CLI.

Vocabulary (case-insensitive; a `torch.` prefix is accepted, and so are `torch.dtype` objects):
`float32` / `fp32` / `float`, `bfloat16` / `bf16`, `float16` / `fp16` / `half`, `float64` / `fp64` / `double`,
and `auto` where the caller allows it (the checkpoint's stored dtype).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, Union

import torch

AUTO = "auto"
# canonical name -> dtype, in the order error messages list them
CANONICAL = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
ALIASES = {
    **{name: name for name in CANONICAL},
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp64": "float64",
    "double": "float64",
}
FLOAT_DTYPES = tuple(CANONICAL.values())
# what each consumer accepts
MODEL_DTYPES = FLOAT_DTYPES
RUN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the CLI's --dtype / --model-dtype
STORAGE_DTYPES = RUN_DTYPES  # activation stores
EXPORT_DTYPES = (torch.float32, torch.float16)  # ONNX / torch.export graphs

DtypeLike = Union[torch.dtype, str]


def parse_dtype(
    value: DtypeLike | None,
    *,
    allowed: Iterable[torch.dtype] = FLOAT_DTYPES,
    allow_auto: bool = False,
    default: torch.dtype | None = None,
    what: str = "dtype",
) -> torch.dtype | Literal["auto"] | None:
    """`value` as a torch dtype (or "auto" when `allow_auto`); None gives `default`.

    A name outside the vocabulary, or a dtype not in `allowed`, is a ValueError naming `what` and the valid choices.
    """
    allowed = tuple(allowed)
    if value is None:
        return default
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key == AUTO and allow_auto:
            return AUTO
        name = ALIASES.get(key)
        dtype = CANONICAL.get(name) if name is not None else None
    elif isinstance(value, torch.dtype):
        dtype = value
    else:
        dtype = None
    if dtype is None or dtype not in allowed:
        raise ValueError(f"{what}={value!r} is not supported; valid: {', '.join(choices(allowed, allow_auto))}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name: torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def choices(allowed: Iterable[torch.dtype] = FLOAT_DTYPES, allow_auto: bool = False) -> list[str]:
    """Canonical names of `allowed` (for error messages and CLI `choices`), "auto" last when allowed."""
    names = [dtype_name(d) for d in allowed]
    return [*names, AUTO] if allow_auto else names


def cli_dtype(allowed: Iterable[torch.dtype] = FLOAT_DTYPES, allow_auto: bool = False):
    """An argparse `type=` that parses with the same vocabulary and returns the canonical name (or "auto")."""
    allowed = tuple(allowed)

    def parse(text: str) -> str:
        import argparse

        try:
            dtype = parse_dtype(text, allowed=allowed, allow_auto=allow_auto)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).replace("dtype=", "")) from None
        return dtype if dtype == AUTO else dtype_name(dtype)

    parse.__name__ = "dtype"
    return parse
