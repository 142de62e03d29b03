"""Modules that splice into hook points (`model.capture(..., intervene={hook: module})` or eagerly with
`model.hooks(interventions=...)`): sparse autoencoders, linear probes, steering vectors, DAS interchange.

Protocol (see `t5hooks.hook_io.apply_intervention`): `module(x)` returns the activation's replacement, or
`(replacement, {output: tensor})`; side outputs come out of a capture as `"<hook name>.<output>"`.
"""

from .das import RotatedSubspaceInterchange, interchange_batch, split_interchange
from .probe import LinearProbe
from .sae import SAE, BatchTopKSAE, JumpReLUSAE, TopKSAE, build_sae
from .steering import SteeringVector

__all__ = [
    "SAE",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "LinearProbe",
    "RotatedSubspaceInterchange",
    "SteeringVector",
    "TopKSAE",
    "build_sae",
    "interchange_batch",
    "split_interchange",
]
