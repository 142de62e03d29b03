"""Which axes of each graph input and output vary: batch, encoder length, decoder length.

Activation axes are read off the hook registry (the axes each HookPoint declares); the tables here are
for the graphs' own inputs and the KV cache. Used by `torch.export` (dynamic shapes), the ONNX exporter (dynamic axes) and the
ONNX Runtime runner (input validation). Axis labels: "batch", "encoder", "decoder", None (static).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..hook_registry import HookLayout, default_layout

Axes = tuple  # tuple[str | None, ...]

BATCH, ENC, DEC = "batch", "encoder", "decoder"
# Generation graphs (onnx_generation.py): decoder positions already in the self-attention KV cache
# (0 at the first step), and the cache length after the step.
PAST, PRESENT = "past", "past + 1"


def activation_axes(name: str, layout: HookLayout | None = None) -> Axes:
    """Axes of the activation at hook point `name`, from the axes its HookPoint declares (`layout`: the
    model's hook registry, `model.layout`; default: HookedEncoderDecoder's)."""
    layout = default_layout() if layout is None else layout
    return layout.spec(name).position_axes()


def output_axes(name: str, layout: HookLayout | None = None) -> Axes:
    if name == "logits":
        return (BATCH, DEC, None)
    if name == "last_hidden_state":  # an encoder-only graph's main output
        return (BATCH, ENC, None)
    if name == "loss":
        return ()
    return activation_axes(name, layout)


def patch_axes(name: str, mode: str, patch_shape: tuple[int, ...], layout: HookLayout | None = None) -> Axes:
    """A "replace" patch has the activation's axes. An "add" patch broadcasts: with full rank, an axis of
    size 1 stays static (it broadcasts) and the others vary with the activation; lower rank is static."""
    axes = activation_axes(name, layout)
    if mode == "replace":
        return axes
    if len(patch_shape) == len(axes):
        return tuple(axis if size != 1 else None for axis, size in zip(axes, patch_shape))
    return (None,) * len(patch_shape)


def step_activation_axes(name: str, layout: HookLayout | None = None) -> Axes:
    """Axes of a decoder activation in a one-step decoder graph: the query axis is fixed at 1 and
    self-attention keys span the cache plus this step."""
    layout = default_layout() if layout is None else layout
    spec = layout.spec(name)
    step = {"pos": None if spec.stack == DEC else spec.stack, "key_pos": PRESENT if spec.key_stack == DEC else ENC}
    return tuple(step.get(axis, label) for axis, label in zip(spec.axes, spec.position_axes()))


CACHE_AXES: Mapping[str, Axes] = {  # K/V tensors [B,H,T,d_head] of the generation graphs
    "past": (BATCH, None, PAST, None),
    "present": (BATCH, None, PRESENT, None),
    "cross": (BATCH, None, ENC, None),
}

INPUT_AXES: Mapping[str, Axes] = {
    "input": (BATCH, ENC),
    "decoder_input": (BATCH, DEC),
    "one_zero_attention_mask": (BATCH, ENC),
    "decoder_attention_mask": (BATCH, DEC),
    "labels": (BATCH, DEC),
}
