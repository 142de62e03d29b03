"""Modules that splice into hook points (`model.capture(..., intervene={hook: module})` or eagerly with
`model.hooks(interventions=...)`): sparse autoencoders, linear probes, steering vectors, DAS interchange, and
their trainers.

Protocol (see `t5hooks.hook_io.apply_intervention`): `module(x)` returns the activation's replacement, or
`(replacement, {output: tensor})`; side outputs come out of a capture as `"<hook name>.<output>"`.

Trainers: `train_saes` / `train_sae` (SAEs from activations: a store, tensors or `LiveActivations`;
sae_training.py) and `train_probe` / `train_steering` / `train_das` (modules spliced into a frozen model;
spliced_training.py). SAELens's folder format: `save_saelens` / `load_saelens`.
"""

from .das import RotatedSubspaceInterchange, interchange_batch, split_interchange
from .live import LiveActivations, ce_loss_recovered
from .probe import LinearProbe
from .sae import SAE, BatchTopKSAE, JumpReLUSAE, TopKSAE, build_sae
from .sae_training import SAETrainConfig, SAETrainer, TrainResult, load_checkpoint, train_sae, train_saes
from .saelens_format import load_saelens, save_saelens
from .spliced_training import (
    InterventionResult,
    load_interventions,
    save_interventions,
    train_das,
    train_interventions,
    train_probe,
    train_steering,
)
from .steering import SteeringVector

__all__ = [
    "SAE",
    "BatchTopKSAE",
    "InterventionResult",
    "JumpReLUSAE",
    "LinearProbe",
    "LiveActivations",
    "RotatedSubspaceInterchange",
    "SAETrainConfig",
    "SAETrainer",
    "SteeringVector",
    "TopKSAE",
    "TrainResult",
    "build_sae",
    "ce_loss_recovered",
    "interchange_batch",
    "load_checkpoint",
    "load_interventions",
    "load_saelens",
    "save_interventions",
    "save_saelens",
    "split_interchange",
    "train_das",
    "train_interventions",
    "train_probe",
    "train_sae",
    "train_saes",
    "train_steering",
]
