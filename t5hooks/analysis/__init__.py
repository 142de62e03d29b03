"""The interpretability layer: activation caches, factored matrices, logit lens and attribution,
activation/attribution patching, norm folding, tables and plots."""

from .cache import ActivationCache, act_name
from .factored_matrix import FactoredMatrix
from .lens import LabelledGrid, LogitLens, format_logit_lens, head_logit_attribution, logit_lens, token_labels

__all__ = [
    "ActivationCache",
    "FactoredMatrix",
    "LabelledGrid",
    "LogitLens",
    "act_name",
    "format_logit_lens",
    "head_logit_attribution",
    "logit_lens",
    "token_labels",
]
