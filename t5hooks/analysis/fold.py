"""Fold every RMSNorm weight into the weights that read the norm's output.

T5's norm is `w * x / rms(x)`, and every reader of a norm is a linear map `W` (nn.Linear layout
`[out, d_model]`), so `W (w * n) = (W diag(w)) n`: scaling W's columns by `w` and setting `w` to ones
leaves every computation unchanged. Afterwards each norm is a pure normalisation, so a residual
component's effect on a reader is `x / scale` times that reader's weight (what direct attribution and
composition scores assume), and `W_Q`, `W_K_cross`, `W_in`, `W_U` ... read the normalised stream.

Folded pairs:
  ln1 (each stack)          -> that block's self-attention W_Q, W_K, W_V
  decoder ln2               -> cross-attention W_Q
  encoder final norm        -> every decoder cross-attention W_K, W_V
  encoder ln2, decoder ln3  -> MLP W_in (and W_gate)
  decoder final norm        -> W_U (a tied embedding is untied: `unembed.lm_head` becomes its own
                               weight, `cfg.tie_word_embeddings` False, `W_E` unchanged)

Logits, residual streams (`*.hook_resid_*`), attention internals (q, k, v, scores, pattern, z),
`hook_scale`, `hook_normalized` and `hook_mlp_in` (pre-norm) are unchanged. Hooks right after a norm lose
the norm's weight: `unembed.hook_in`, and `hook_encoder_out`, which becomes the *normalised* encoder output
(equal to `encoder_final_ln.hook_normalized`), as does `model.encode(...)`; multiply by the original
encoder final-norm weight to recover the unfolded value. Patches written for an unfolded model's
`hook_encoder_out` do not carry over.

Parameters are replaced by new tensors, never modified in place: weights shared with another model
(e.g. a Hugging Face model loaded with `from_pretrained(hf_model=...)`) stay intact, and optimisers
holding the old parameters must be rebuilt. Folding twice is a no-op (the weights are ones).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def fold_layer_norms(model: Any) -> Any:
    """Fold all RMSNorm weights of a `HookedEncoderDecoder` into the following weights (see module doc);
    returns the model."""
    fold_encoder_norms(model)
    cross_kv = [(block.cross_attn, name) for block in model.decoder for name in ("k_proj", "v_proj")]
    _fold(model.encoder_final_ln, cross_kv)
    for block in model.decoder:
        _fold(block.ln1, [(block.attn, "q_proj"), (block.attn, "k_proj"), (block.attn, "v_proj")])
        _fold(block.ln2, [(block.cross_attn, "q_proj")])
        _fold(block.ln3, _mlp_readers(block.mlp))
    _fold_into_unembedding(model)
    return model


def fold_encoder_norms(model: Any) -> Any:
    """Fold each encoder block's ln1 / ln2 weights into its attention Q/K/V and MLP inputs (the encoder final
    norm's readers are the decoder's cross-attentions, folded by `fold_layer_norms`); returns the model."""
    for block in model.encoder:
        _fold(block.ln1, [(block.attn, "q_proj"), (block.attn, "k_proj"), (block.attn, "v_proj")])
        _fold(block.ln2, _mlp_readers(block.mlp))
    return model


def _mlp_readers(mlp: nn.Module) -> list[tuple[nn.Module, str]]:
    readers = [(mlp, "in_proj")]
    if mlp.gate_proj is not None:
        readers.append((mlp, "gate_proj"))
    return readers


def _fold(norm: nn.Module, readers: list[tuple[nn.Module, str]]) -> None:
    """Scale each reader's input columns by the norm weight, then make the weight ones."""
    w = norm.w.detach()  # [d_model]
    for module, attr in readers:
        setattr(module, attr, _new_parameter(_scale_columns(getattr(module, attr), w), getattr(module, attr)))
    norm.w = _new_parameter(torch.ones_like(w), norm.w)


def _fold_into_unembedding(model: Any) -> None:
    unembed, norm = model.unembed, model.decoder_final_ln
    weight = model.embed.W_E if unembed.lm_head is None else unembed.lm_head  # [d_vocab, d_model]
    unembed.lm_head = _new_parameter(_scale_columns(weight, norm.w.detach()), weight)
    model.cfg.tie_word_embeddings = False
    norm.w = _new_parameter(torch.ones_like(norm.w), norm.w)


def _scale_columns(weight: Tensor, w: Tensor) -> Tensor:  # [out, d_model] * [d_model] -> [out, d_model]
    return (weight.detach().float() * w.float()).to(weight.dtype)


def _new_parameter(value: Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(value, requires_grad=like.requires_grad)
