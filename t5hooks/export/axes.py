"""Which axes of each graph input and output vary: batch, encoder length, decoder length.

One table, used by `torch.export` (dynamic shapes), the ONNX exporter (dynamic axes) and the
ONNX Runtime runner (input validation). Axis labels: "batch", "encoder", "decoder", None (static).
"""

from __future__ import annotations

from collections.abc import Mapping

Axes = tuple  # tuple[str | None, ...]

BATCH, ENC, DEC = "batch", "encoder", "decoder"
# Generation graphs (onnx_generation.py): decoder positions already in the self-attention KV cache
# (0 at the first step), and the cache length after the step.
PAST, PRESENT = "past", "past + 1"


def activation_axes(name: str) -> Axes:
    """Axes of the activation at hook point `name` (see DESIGN.md for the shapes)."""
    parts = name.split(".")
    if name in ("hook_embed", "hook_encoder_out") or parts[0] == "encoder_final_ln":
        return (BATCH, ENC, None)
    if name in ("hook_decoder_embed", "unembed.hook_in") or parts[0] == "decoder_final_ln":
        return (BATCH, DEC, None)
    stack = ENC if parts[0] == "encoder" else DEC
    leaf = parts[-1]
    cross = "cross_attn" in parts
    key_len = ENC if cross else stack
    if leaf == "rel_pos_hook":
        return (None, None, stack, stack)
    if leaf in ("hook_attn_scores", "hook_pattern"):
        return (BATCH, None, stack, key_len)
    if leaf in ("hook_k", "hook_v"):
        return (BATCH, key_len, None, None)
    if leaf in ("hook_q", "hook_z", "hook_result"):
        return (BATCH, stack, None, None)
    return (BATCH, stack, None)  # residual streams, norms, MLP activations


def output_axes(name: str) -> Axes:
    if name == "logits":
        return (BATCH, DEC, None)
    if name == "last_hidden_state":  # an encoder-only graph's main output
        return (BATCH, ENC, None)
    if name == "loss":
        return ()
    return activation_axes(name)


def patch_axes(name: str, mode: str, patch_shape: tuple[int, ...]) -> Axes:
    """A "replace" patch has the activation's axes. An "add" patch broadcasts: with full rank, an axis of
    size 1 stays static (it broadcasts) and the others vary with the activation; lower rank is static."""
    axes = activation_axes(name)
    if mode == "replace":
        return axes
    if len(patch_shape) == len(axes):
        return tuple(axis if size != 1 else None for axis, size in zip(axes, patch_shape))
    return (None,) * len(patch_shape)


def step_activation_axes(name: str) -> Axes:
    """Axes of a decoder activation in a one-step decoder graph: the query axis is fixed at 1 and
    self-attention keys span the cache plus this step."""
    axes = list(activation_axes(name))
    leaf = name.split(".")[-1]
    if leaf in ("hook_attn_scores", "hook_pattern", "rel_pos_hook") and "cross_attn" not in name:
        axes[3] = PRESENT
    return tuple(None if axis == DEC else axis for axis in axes)


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
