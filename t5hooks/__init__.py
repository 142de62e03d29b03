"""t5hooks: a hooked T5 encoder-decoder whose hook points are also explicit graph outputs."""

from .analysis.cache import ActivationCache, act_name
from .analysis.factored_matrix import FactoredMatrix
from .capture import compile_capture
from .config import HookedT5Config
from .encoder import HookedT5Encoder
from .hook_io import HookIO
from .hook_points import HookedRootModule, HookPoint
from .model import HookedEncoderDecoder

__version__ = "0.1.0"

__all__ = [
    "ActivationCache",
    "act_name",
    "compile_capture",
    "FactoredMatrix",
    "HookIO",
    "HookPoint",
    "HookedEncoderDecoder",
    "HookedRootModule",
    "HookedT5Encoder",
    "HookedT5Config",
]
