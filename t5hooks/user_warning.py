"""Warnings addressed to the user's own call: shown at the first frame outside t5hooks and torch."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

_INSIDE = (str(Path(__file__).resolve().parent), str(Path(torch.__file__).resolve().parent))


def caller_stacklevel() -> int:
    """The `warnings.warn` stacklevel of the first frame outside t5hooks and torch (the user's call)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn` pointed at the user's line (Python's filters decide repetition, as for any warning)."""
    warnings.warn(message, category, stacklevel=caller_stacklevel())
