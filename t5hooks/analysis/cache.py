"""ActivationCache: the activations of one run, by hook name, aware of the encoder and decoder stacks.

TransformerLens's cache helpers assume one stack (`blocks.{l}`, `ln_final`). A T5 has two stacks, and
the decoder has a cross-attention sublayer, so every residual helper here takes `stack`
("encoder" | "decoder"), attention helpers take `attn` ("self" | "cross"), and the point a residual
stream is read at is named as in TransformerLens (`layer`, `mlp_input`) plus `cross_attn_input` for
the decoder's cross-attention input. Layer `l` of a stack means "the input to block `l`"; layer
`n_layers` (or None, or -1) means the input to that stack's final RMSNorm.

Normalisation is T5's: `RMSNorm(x) = w * x / scale` with the cached `hook_scale`, and on the
decoder's output path also T5 v1.0's `d_model**-0.5` logit scaling, so a normalised decoder stack
times `W_U` gives logits exactly (T5 has no biases anywhere).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, Union

import torch
from torch import Tensor

from ..hook_registry import HookLayout, HookSpec, default_layout, unknown_name_message

STACKS = ("encoder", "decoder")
ATTN_KINDS = ("self", "cross")
NORMS = ("ln1", "ln2", "ln3", "final")

Stack = Literal["encoder", "decoder"]
AttnKind = Literal["self", "cross"]
# TransformerLens's Slice inputs: None (all), an int (one index, the dim is dropped), a (start, stop[, step])
# tuple or a slice, or a list / tensor of indices.
SliceInput = Union[None, int, slice, tuple, Sequence[int], Tensor]

# ---- short activation names ----------------------------------------------------------------
# TransformerLens's other names for some activations. Every other short name is read off the hook registry
# (hook_points.HookLayout): a point's leaf without `hook_` (`hook_resid_pre` -> "resid_pre"), or its alias.
_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "query": "q",
    "key": "k",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_post": "post",
    "rel_pos_bias": "rel_pos",
    "unembed": "unembed_in",
}


def short_names(layout: HookLayout | None = None) -> tuple[str, ...]:
    """Every short name `act_name` accepts (registry order, then TransformerLens aliases)."""
    layout = default_layout() if layout is None else layout
    names = dict.fromkeys(n for spec in layout.values() for n in spec.short_names)
    return (*names, *_ALIASES)


def act_name(
    name: str,
    layer: int | None = None,
    stack: Stack = "decoder",
    attn: AttnKind = "self",
    ln: str | None = None,
    layout: HookLayout | None = None,
) -> str:
    """Full hook name from a TransformerLens-style short name.

    `act_name("pattern", 3, attn="cross")` -> "decoder.3.cross_attn.hook_pattern";
    `act_name("resid_pre", 0, "encoder")` -> "encoder.0.hook_resid_pre";
    `act_name("scale", 1, "encoder", ln="ln2")` -> "encoder.1.ln2.hook_scale";
    `act_name("scale")` -> "decoder_final_ln.hook_scale" (no layer: the stack's final norm);
    `act_name("embed", stack="encoder")` -> "hook_embed" ("embed" of the decoder is "hook_decoder_embed").
    A full hook name (with a dot, or starting with "hook_") and no layer is returned unchanged.
    Names come from the hook registry of `layout` (default: HookedEncoderDecoder's, every option on).
    """
    if not isinstance(name, str):
        raise TypeError(f"activation name must be a string, got {type(name).__name__}")
    if layer is None and ("." in name or name.startswith("hook_")):
        return name
    check_choice("stack", stack, STACKS)
    check_choice("attn", attn, ATTN_KINDS)
    if attn == "cross" and stack == "encoder":
        raise ValueError("cross-attention exists only in the decoder: use stack='decoder' with attn='cross'")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise ValueError(f"layer must be a non-negative int (or None), got {layer!r}")
    layout = default_layout() if layout is None else layout
    name = _ALIASES.get(name, name)
    if attn == "cross" and name == "attn_out":
        name = "cross_attn_out"
    named = [spec for spec in layout.values() if name in spec.short_names]
    if not named:
        raise ValueError(
            f"unknown activation {name!r}; short names: {', '.join(short_names(layout))} (or a full hook name)"
        )
    if layer is None:
        return _unlayered_name(name, named, stack, ln)
    here = [s for s in named if s.layered and s.stack == stack]
    if not here:
        other = {s.stack for s in named if s.layered}
        if other:
            raise ValueError(f"{name!r} exists only in the {' and '.join(sorted(other))} (not in the {stack})")
        raise ValueError(f"{name!r} is not inside a layer: call act_name({name!r}) without a layer")
    here = [s for s in here if s.attn in (None, attn)] or here
    if len(here) > 1:
        norms = [s.owner for s in here]
        picked = [s for s in here if s.owner == ln]
        if len(picked) != 1:
            raise ValueError(
                f"{name!r} at layer {layer} of the {stack} needs ln= one of {tuple(norms)} (decoder: ln1 before "
                f"self-attention, ln2 before cross-attention, ln3 before the MLP; encoder: ln1, ln2 before the MLP)"
            )
        here = picked
    return here[0].template.replace("{l}", str(layer), 1)


def _unlayered_name(name: str, named: list[HookSpec], stack: str, ln: str | None) -> str:
    """A short name without a layer: a point outside the layers (of `stack`, else the only one), or a
    point that only layer 0 holds (the position bias)."""
    outside = [s for s in named if not s.layered]
    if outside:
        if ln not in (None, "final"):
            raise ValueError(f"{name!r} with ln={ln!r} needs a layer; without a layer it is the stack's final norm")
        mine = [s for s in outside if s.stack == stack]
        if len(mine) == 1 or len(outside) == 1:
            return (mine or outside)[0].template
    only_layer0 = [s for s in named if s.layered and s.stack == stack and s.layers == frozenset({0})]
    if len(only_layer0) == 1:  # one per stack, owned by layer 0 and shared by every layer
        return only_layer0[0].template.replace("{l}", "0", 1)
    raise ValueError(f"{name!r} exists in every layer: pass layer=")


def apply_slice(x: Tensor, selection: SliceInput, dim: int) -> Tensor:
    """Select along `dim` with TransformerLens's Slice semantics (an int drops the dimension)."""
    if selection is None:
        return x
    if isinstance(selection, int) and not isinstance(selection, bool):
        return x.select(dim, selection)
    if isinstance(selection, tuple):
        selection = slice(*selection)
    if isinstance(selection, slice):
        index = [slice(None)] * (dim % x.ndim) + [selection]
        return x[tuple(index)]
    indices = torch.as_tensor(selection, dtype=torch.long, device=x.device)
    if indices.ndim != 1:
        raise ValueError(f"index selection must be 1-D, got shape {tuple(indices.shape)}")
    size = x.shape[dim]
    if indices.numel() and (int(indices.min()) < -size or int(indices.max()) >= size):
        raise IndexError(f"indices {indices.tolist()} out of range for a dimension of size {size}")
    return x.index_select(dim, indices % size)  # negative indices count from the end, as in Python


def _check_layer_arg(layer: Any) -> None:
    """The layer slot takes a layer; the stack is a keyword (`stack="encoder"`), as TransformerLens's order."""
    if isinstance(layer, str):
        raise TypeError(
            f"got {layer!r} where the layer goes: the arguments follow TransformerLens's order and the stack is a "
            f"keyword (default 'decoder'), e.g. decompose_resid(2, stack={layer!r})"
        )


# TransformerLens's layer_type / sublayer_type words -> (attention kind, norm) here.
_LAYER_TYPES = {
    "a": "attn",
    "attn": "attn",
    "m": "mlp",
    "mlp": "mlp",
    "b": "block",
    "block": "block",
    "ln_final": "final",
}


def _sublayer(kind: str, attn: str, ln: str | None) -> tuple[str, str | None]:
    kind = _LAYER_TYPES.get(kind, kind)
    if kind in ATTN_KINDS:
        return kind, ln
    if kind in NORMS:
        return attn, kind
    if kind in ("attn", "mlp", "block"):
        return attn, ln
    raise ValueError(f"sublayer_type={kind!r}; valid: attn/a, mlp/m, block/b, ln1, ln2, ln3, ln_final, self, cross")


def check_choice(what: str, value: Any, valid: Sequence[str]) -> None:
    """ValueError naming the argument, the bad value and the valid ones."""
    if value not in valid:
        raise ValueError(f"{what}={value!r}; valid: {', '.join(repr(v) for v in valid)}")


class ActivationCache(Mapping):
    """A read-only mapping `hook name -> tensor` from `run_with_cache`, with TransformerLens's conveniences.

    Keys are full hook names, or tuples read through `act_name`: a short name followed, in any order, by a
    layer (int, negative counts from the end of the stack), a stack, an attention kind and a norm, e.g.
    `cache["pattern", 0, "cross"]`, `cache["resid_post", -1, "encoder"]`, `cache["scale", 2, "ln3"]`.
    """

    def __init__(self, cache_dict: dict[str, Tensor], model: Any, has_batch_dim: bool = True) -> None:
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    # ---- mapping -----------------------------------------------------------------------
    def __getitem__(self, key: str | tuple) -> Tensor:
        name = self._key_to_name(key) if isinstance(key, tuple) else key
        if name in self.cache_dict:
            return self.cache_dict[name]
        shown = f"{key!r} -> {name!r}" if name != key else repr(name)
        raise KeyError(unknown_name_message(name, list(self.cache_dict)) + f" (in this cache; looked up {shown})")

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, tuple):
            try:
                key = self._key_to_name(key)
            except (KeyError, ValueError):
                return False
        return key in self.cache_dict

    def __repr__(self) -> str:
        more = " ..." if len(self) > 6 else ""
        return f"ActivationCache with {len(self)} activations: {list(self.cache_dict)[:6]}{more}"

    def _key_to_name(self, key: tuple) -> str:
        if not key or not isinstance(key[0], str):
            raise KeyError(f"tuple key {key!r} must start with an activation name, e.g. ('pattern', 0, 'cross')")
        parts: dict[str, Any] = {}
        for part in key[1:]:
            if part is None:
                continue
            if part in _LAYER_TYPES:  # TransformerLens's layer_type: "attn"/"a", "mlp"/"m", "block"/"b", "ln_final"
                if _LAYER_TYPES[part] != "final":
                    continue  # implied by the activation name
                field, part = "ln", "final"
            elif isinstance(part, int) and not isinstance(part, bool):
                field = "layer"
            elif part in STACKS:
                field = "stack"
            elif part in ATTN_KINDS:
                field = "attn"
            elif part in NORMS:
                field = "ln"
            else:
                raise KeyError(
                    f"cannot read {part!r} in key {key!r}: after the name come a layer (int), a stack "
                    f"{STACKS}, an attention kind {ATTN_KINDS}, a norm {NORMS} and/or a TransformerLens layer "
                    f"type {tuple(_LAYER_TYPES)}"
                )
            if field in parts:
                raise KeyError(f"key {key!r} gives the {field} twice")
            parts[field] = part
        stack = parts.get("stack", "decoder")
        if parts.get("layer") is not None and parts["layer"] < 0:
            parts["layer"] += self._n_layers(stack)
        try:
            return act_name(key[0], **parts)
        except ValueError as err:
            raise KeyError(str(err)) from err

    # ---- moving ------------------------------------------------------------------------
    def to(self, device: str | torch.device, move_model: bool = False) -> ActivationCache:
        """Move every activation (and optionally the model) to `device`; returns self."""
        self.cache_dict = {name: t.to(device) for name, t in self.cache_dict.items()}
        if move_model:
            self.model.to(device)
        return self

    def toggle_autodiff(self, mode: bool = False) -> None:
        """TransformerLens's switch: turn autograd on or off globally (`torch.set_grad_enabled(mode)`)."""
        torch.set_grad_enabled(mode)

    def apply_slice_to_batch_dim(self, batch_slice: SliceInput) -> ActivationCache:
        """A new cache holding only the selected examples (an int keeps no batch dimension, as TL).
        Activations with a batch of one that is shared by all examples (`rel_pos_hook`) are kept whole."""
        if not self.has_batch_dim:
            raise ValueError("this cache has no batch dimension to slice")
        if batch_slice is None:
            return self
        batch = self[act_name("decoder_embed")].shape[0] if "hook_decoder_embed" in self else None
        sliced = {}
        for name, t in self.cache_dict.items():
            shared = name.endswith("rel_pos_hook") and t.shape[0] == 1 and batch != 1
            sliced[name] = t if shared else apply_slice(t, batch_slice, dim=0)
        keeps_dim = not (isinstance(batch_slice, int) and not isinstance(batch_slice, bool))
        return ActivationCache(sliced, self.model, has_batch_dim=keeps_dim)

    def compute_head_results(self) -> None:
        """Add every attention layer's per-head outputs (`...hook_result` `[*batch, pos, H, d_model]`) to the
        cache, computed from the cached `hook_z` and `W_O`, as TransformerLens's."""
        for stack in STACKS:
            for l in range(self._n_layers(stack)):
                for attn in ("self", "cross") if stack == "decoder" else ("self",):
                    if act_name("z", l, stack, attn) in self.cache_dict:
                        self.cache_dict[act_name("result", l, stack, attn)] = self.head_results(stack, l, attn)

    def get_neuron_results(
        self, layer: int, neuron_slice: SliceInput = None, pos_slice: SliceInput = None, *, stack: Stack = "decoder"
    ) -> Tensor:  # [*batch_and_pos, neurons, d_model]
        """Each neuron's output of one MLP: its `hook_post` activation times its `W_out` row."""
        _check_layer_arg(layer)
        if isinstance(neuron_slice, int) and not isinstance(neuron_slice, bool):
            neuron_slice = [neuron_slice]
        post = apply_slice(self[act_name("post", layer, stack)], pos_slice, dim=-2)  # [*batch_and_pos, d_mlp]
        post = apply_slice(post, neuron_slice, dim=-1)
        W_out = apply_slice(self.model.mod_dict[f"{stack}.{layer}.mlp"].W_out, neuron_slice, dim=0)
        return post[..., None] * W_out.to(device=post.device, dtype=post.dtype)

    def remove_batch_dim(self) -> ActivationCache:
        """Drop the batch dimension of a batch-of-one cache in place; returns self."""
        if not self.has_batch_dim:
            return self
        sizes = {t.shape[0] for t in self.cache_dict.values()}
        if sizes - {1}:
            raise ValueError(f"remove_batch_dim needs a batch of 1; this cache has batch sizes {sorted(sizes)}")
        self.cache_dict = {name: t[0] for name, t in self.cache_dict.items()}
        self.has_batch_dim = False
        return self

    # ---- layers and norms ----------------------------------------------------------------
    def _n_layers(self, stack: str) -> int:
        check_choice("stack", stack, STACKS)
        return self.model.cfg.n_layers if stack == "encoder" else self.model.cfg.n_decoder_layers

    def _resolve_layer(self, stack: str, layer: int | None) -> int:
        """None -> n_layers (the final norm's input); negative counts back from n_layers (-1 -> n_layers)."""
        n = self._n_layers(stack)
        if layer is None:
            return n
        resolved = n + 1 + layer if layer < 0 else layer
        if not 0 <= resolved <= n:
            raise ValueError(
                f"layer={layer} is out of range for the {stack} ({n} layers): valid 0..{n} (n = its final "
                f"norm's input), None, or negative from -1 (= {n})"
            )
        return resolved

    def _norm_name(self, stack: str, layer: int, mlp_input: bool, cross_attn_input: bool) -> str:
        """The RMSNorm that reads the residual stream at this point (layer already resolved)."""
        if mlp_input and cross_attn_input:
            raise ValueError("mlp_input and cross_attn_input are exclusive: a point is the input of one sublayer")
        if cross_attn_input and stack != "decoder":
            raise ValueError("cross_attn_input=True exists only for stack='decoder'")
        if layer == self._n_layers(stack):
            if mlp_input or cross_attn_input:
                raise ValueError(f"layer={layer} is the {stack}'s final norm input: it has no MLP or cross-attention")
            return f"{stack}_final_ln"
        if mlp_input:
            return f"{stack}.{layer}.{'ln3' if stack == 'decoder' else 'ln2'}"
        if cross_attn_input:
            return f"decoder.{layer}.ln2"
        return f"{stack}.{layer}.ln1"

    def apply_ln_to_stack(
        self,
        residual_stack: Tensor,  # [components, *batch_and_pos, d_model]
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: SliceInput = None,
        batch_slice: SliceInput = None,
        has_batch_dim: bool = True,
        *,
        stack: Stack = "decoder",
        cross_attn_input: bool = False,
        recompute_ln: bool = False,
    ) -> Tensor:  # [components, *batch_and_pos, d_model]
        """Treat each component as part of the residual stream read at (`stack`, `layer`) and apply that
        read's RMSNorm: `w * x / scale` with the cached `hook_scale` of the full stream (linear, so components
        still sum to the normalised stream).

        The norm is ln1 of `layer` (ln2 with `mlp_input` in the encoder; ln2 with `cross_attn_input`, ln3 with
        `mlp_input` in the decoder), or the stack's final norm for layer None / -1 / n_layers. The decoder's final
        norm includes T5 v1.0's `d_model**-0.5` logit scaling, so the result times `W_U` is logits. With
        `recompute_ln`, each component is normalised by its own RMS instead (the model's norm module: a logit
        lens). As TransformerLens: `pos_slice` must already be applied to `residual_stack` (it selects the
        scale); `batch_slice` is applied here, to the stack (dim 1, with `has_batch_dim`) and to the scale.
        """
        _check_layer_arg(layer)
        layer = self._resolve_layer(stack, layer)
        norm_name = self._norm_name(stack, layer, mlp_input, cross_attn_input)
        norm = self.model.mod_dict[norm_name]
        if has_batch_dim:
            residual_stack = apply_slice(residual_stack, batch_slice, dim=1)
        if recompute_ln:
            out = norm(residual_stack)
        else:
            scale = apply_slice(self[f"{norm_name}.hook_scale"], pos_slice, dim=-2)  # [*batch_and_pos, 1]
            if self.has_batch_dim:
                scale = apply_slice(scale, batch_slice, dim=0)
            out = norm.w * (residual_stack / scale).to(norm.w.dtype)
        if norm_name == "decoder_final_ln" and self.model.unembed.scale is not None:
            out = out * self.model.unembed.scale
        return out

    # ---- residual stream -------------------------------------------------------------------
    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: SliceInput = None,
        mlp_input: bool = False,
        return_labels: bool = False,
        *,
        stack: Stack = "decoder",
        cross_attn_input: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:  # [points, *batch_and_pos, d_model]
        """The residual stream of `stack` at each block input up to `layer`: "{l}_pre" per block, and
        "final_post" (the final norm's input) when `layer` is None / -1 / n_layers.

        `incl_mid` adds each earlier block's mid-points ("{l}_mid"; decoder also "{l}_mid_cross", after
        cross-attention). `mlp_input` / `cross_attn_input` end at that sublayer's input of `layer`.
        `apply_ln` applies the norm that reads the last point; at the final norm each stream is normalised by
        its own RMS (a logit lens: for the decoder, the result times `W_U` is each point's logits).
        """
        _check_layer_arg(layer)
        n = self._n_layers(stack)
        layer = self._resolve_layer(stack, layer)
        self._norm_name(stack, layer, mlp_input, cross_attn_input)  # validates the read point
        names, labels = [], []
        for l in range(layer + 1):
            if l == n:
                names.append(act_name("resid_post", n - 1, stack))
                labels.append("final_post")
                break
            names.append(act_name("resid_pre", l, stack))
            labels.append(f"{l}_pre")
            mids = []
            if l < layer and incl_mid:
                mids = ["resid_mid", "resid_mid_cross"] if stack == "decoder" else ["resid_mid"]
            elif l == layer and cross_attn_input:
                mids = ["resid_mid"]
            elif l == layer and mlp_input and stack == "encoder":
                mids = ["resid_mid"]
            elif l == layer and mlp_input:  # the decoder MLP reads resid_mid_cross
                mids = ["resid_mid", "resid_mid_cross"] if incl_mid else ["resid_mid_cross"]
            for mid in mids:
                names.append(act_name(mid, l, stack))
                labels.append(f"{l}_{mid.removeprefix('resid_')}")
        components = torch.stack([apply_slice(self[name], pos_slice, dim=-2) for name in names])
        if apply_ln:
            components = self.apply_ln_to_stack(
                components,
                layer,
                mlp_input,
                pos_slice=pos_slice,
                stack=stack,
                cross_attn_input=cross_attn_input,
                recompute_ln=layer == n,
            )
        return (components, labels) if return_labels else components

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: Literal["all", "attn", "self_attn", "cross_attn", "mlp"] = "all",
        apply_ln: bool = False,
        pos_slice: SliceInput = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
        *,
        stack: Stack = "decoder",
        cross_attn_input: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:  # [components, *batch_and_pos, d_model]
        """The residual stream read at (`stack`, `layer`) as a stack of the outputs that sum to it: "embed",
        then per block "{l}_attn_out", (decoder) "{l}_cross_attn_out", "{l}_mlp_out".

        `mode`: "all", "attn" (self- and cross-attention), "self_attn", "cross_attn" or "mlp". With
        `cross_attn_input` / `mlp_input` the sublayers of `layer` before that input are included.
        """
        _check_layer_arg(layer)
        check_choice("mode", mode, ("all", "attn", "self_attn", "cross_attn", "mlp"))
        layer = self._resolve_layer(stack, layer)
        self._norm_name(stack, layer, mlp_input, cross_attn_input)
        kinds = {
            "attn_out": mode in ("all", "attn", "self_attn"),
            "cross_attn_out": stack == "decoder" and mode in ("all", "attn", "cross_attn"),
            "mlp_out": mode in ("all", "mlp"),
        }
        names, labels = [], []
        if incl_embeds:
            names.append(act_name("embed", stack=stack))
            labels.append("embed")
        for l in range(layer + 1):
            if l < layer:
                present = ["attn_out", "cross_attn_out", "mlp_out"]
            elif cross_attn_input:
                present = ["attn_out"]
            elif mlp_input:
                present = ["attn_out", "cross_attn_out"]
            else:
                break
            for kind in present:
                if kinds[kind]:
                    names.append(act_name(kind, l, stack))
                    labels.append(f"{l}_{kind}")
        components = self._stack([apply_slice(self[name], pos_slice, dim=-2) for name in names], stack, pos_slice)
        if apply_ln:
            components = self.apply_ln_to_stack(
                components, layer, mlp_input, pos_slice, stack=stack, cross_attn_input=cross_attn_input
            )
        return (components, labels) if return_labels else components

    def _stack(self, components: list[Tensor], stack: str, pos_slice: SliceInput) -> Tensor:
        """torch.stack, or an empty `[0, *batch_and_pos, d_model]` stack shaped like this stack's embedding."""
        if components:
            return torch.stack(components)
        like = apply_slice(self[act_name("embed", stack=stack)], pos_slice, dim=-2)
        return like.new_zeros((0, *like.shape))

    def _with_remainder(
        self, components: Tensor, labels: list[str], stack: str, layer: int, pos_slice: SliceInput
    ) -> Tensor:
        """Append "remainder": the residual stream read at the input of `layer` minus the components' sum."""
        n = self._n_layers(stack)
        name = act_name("resid_post", n - 1, stack) if layer == n else act_name("resid_pre", layer, stack)
        resid = apply_slice(self[name], pos_slice, dim=-2)
        labels.append("remainder")
        return torch.cat([components, (resid - components.sum(0))[None]])

    def _finish_per_unit(
        self,
        components: Tensor,
        labels: list[str],
        stack: str,
        layer: int,
        pos_slice: SliceInput,
        incl_remainder: bool,
        apply_ln: bool,
        return_labels: bool,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """The shared tail of the per-head / per-neuron stacks: remainder, normalisation, labels."""
        if incl_remainder:
            components = self._with_remainder(components, labels, stack, layer, pos_slice)
        if apply_ln:
            components = self.apply_ln_to_stack(components, layer, pos_slice=pos_slice, stack=stack)
        return (components, labels) if return_labels else components

    # ---- per head and per neuron ---------------------------------------------------------
    def head_results(self, stack: Stack, layer: int, attn: AttnKind = "self") -> Tensor:
        """Per-head attention outputs `[*batch, pos, H, d_model]` of one layer: `hook_result` when cached,
        else computed from the cached `hook_z` and `W_O` (their sum over heads is the sublayer's output)."""
        name = act_name("result", layer, stack, attn)
        if name in self.cache_dict:
            return self.cache_dict[name]
        z = self[act_name("z", layer, stack, attn)]  # [*batch, pos, H, d_head]
        module = self.model.mod_dict[f"{stack}.{layer}.{'cross_attn' if attn == 'cross' else 'attn'}"]
        W_O = module.W_O.to(device=z.device, dtype=z.dtype)  # [H, d_head, d_model]
        return torch.einsum("...hd,hdm->...hm", z, W_O)

    def stack_head_results(
        self,
        layer: int | None = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: SliceInput = None,
        apply_ln: bool = False,
        *,
        stack: Stack = "decoder",
        attn: AttnKind = "self",
    ) -> Tensor | tuple[Tensor, list[str]]:  # [layers * H (+1), *batch_and_pos, d_model]
        """Every head's output for the heads of layers strictly before `layer` (None: all), labelled "L{l}H{h}"
        (cross-attention: "L{l}H{h}_cross"). `incl_remainder` appends the rest of the residual stream read at
        `layer`'s input; `apply_ln` applies the norm there (see `apply_ln_to_stack`)."""
        _check_layer_arg(layer)
        check_choice("attn", attn, ATTN_KINDS)
        if attn == "cross" and stack != "decoder":
            raise ValueError("cross-attention heads exist only in the decoder: stack='decoder'")
        layer = self._resolve_layer(stack, layer)
        H = self.model.cfg.n_heads
        suffix = "_cross" if attn == "cross" else ""
        parts, labels = [], []
        for l in range(layer):
            result = apply_slice(self.head_results(stack, l, attn), pos_slice, dim=-3)  # [*batch_and_pos, H, d_model]
            parts.append(result.movedim(-2, 0))
            labels.extend(f"L{l}H{h}{suffix}" for h in range(H))
        components = torch.cat(parts) if parts else self._stack([], stack, pos_slice)
        return self._finish_per_unit(
            components, labels, stack, layer, pos_slice, incl_remainder, apply_ln, return_labels
        )

    def stack_neuron_results(
        self,
        layer: int | None = None,
        pos_slice: SliceInput = None,
        neuron_slice: SliceInput = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
        *,
        stack: Stack = "decoder",
    ) -> Tensor | tuple[Tensor, list[str]]:  # [layers * neurons (+1), *batch_and_pos, d_model]
        """Every MLP neuron's output (`hook_post` activation times its `W_out` row) for the MLPs of layers
        strictly before `layer`, labelled "L{l}N{n}". Memory: one d_model vector per neuron and position."""
        _check_layer_arg(layer)
        layer = self._resolve_layer(stack, layer)
        if isinstance(neuron_slice, int) and not isinstance(neuron_slice, bool):
            neuron_slice = [neuron_slice]  # keep the neuron dimension: layers are concatenated along it
        neuron_ids = apply_slice(torch.arange(self.model.cfg.d_mlp), neuron_slice, dim=0).tolist()
        parts, labels = [], []
        for l in range(layer):
            parts.append(self.get_neuron_results(l, neuron_slice, pos_slice, stack=stack).movedim(-2, 0))
            labels.extend(f"L{l}N{n}" for n in neuron_ids)
        components = torch.cat(parts) if parts else self._stack([], stack, pos_slice)
        return self._finish_per_unit(
            components, labels, stack, layer, pos_slice, incl_remainder, apply_ln, return_labels
        )

    def get_full_resid_decomposition(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice: SliceInput = None,
        return_labels: bool = False,
        *,
        stack: Stack = "decoder",
        cross_attn_input: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:  # [components, *batch_and_pos, d_model]
        """The residual stream read at (`stack`, `layer`) split into every self-attention head, (decoder) every
        cross-attention head, every MLP neuron (or each MLP with `expand_neurons=False`), and the embedding.
        T5 has no biases, so these sum to the stream exactly."""
        _check_layer_arg(layer)
        layer = self._resolve_layer(stack, layer)
        self._norm_name(stack, layer, mlp_input, cross_attn_input)
        # Sublayers of `layer` itself that come before the read point.
        self_heads_to = layer + (1 if mlp_input or cross_attn_input else 0)
        cross_heads_to = layer + (1 if mlp_input else 0)
        parts, labels = [], []

        def add(result: tuple[Tensor, list[str]]) -> None:
            parts.append(result[0])
            labels.extend(result[1])

        add(self.stack_head_results(self_heads_to, True, pos_slice=pos_slice, stack=stack, attn="self"))
        if stack == "decoder":
            add(self.stack_head_results(cross_heads_to, True, pos_slice=pos_slice, stack=stack, attn="cross"))
        if expand_neurons:
            add(self.stack_neuron_results(layer, pos_slice=pos_slice, return_labels=True, stack=stack))
        else:
            add(
                self.decompose_resid(
                    layer, mode="mlp", pos_slice=pos_slice, incl_embeds=False, return_labels=True, stack=stack
                )
            )
        parts.append(apply_slice(self[act_name("embed", stack=stack)], pos_slice, dim=-2)[None])
        labels.append("embed")
        components = torch.cat(parts)
        if apply_ln:
            components = self.apply_ln_to_stack(
                components, layer, mlp_input, pos_slice, stack=stack, cross_attn_input=cross_attn_input
            )
        return (components, labels) if return_labels else components

    def stack_activation(
        self,
        activation_name: str,
        layer: int | None = -1,
        sublayer_type: str | None = None,
        *,
        stack: Stack = "decoder",
        attn: AttnKind = "self",
        ln: str | None = None,
    ) -> Tensor:  # [layers, ...]
        """One activation (short name, see `act_name`) stacked over the layers of `stack` before `layer`.
        `sublayer_type` as TransformerLens's ("attn"/"a", "mlp"/"m", "block"/"b", "ln1", "ln2", "ln3"; "cross"
        for cross-attention)."""
        _check_layer_arg(layer)
        if sublayer_type is not None:
            attn, ln = _sublayer(sublayer_type, attn, ln)
        layer = self._resolve_layer(stack, layer)
        if layer == 0:
            raise ValueError("stack_activation needs layer >= 1 (it stacks the layers strictly before it)")
        return torch.stack([self[act_name(activation_name, l, stack, attn, ln)] for l in range(layer)])

    # ---- views ---------------------------------------------------------------------------
    def attention_view(
        self,
        tokens: Tensor | Sequence[str] | None = None,
        decoder_tokens: Tensor | Sequence[str] | None = None,
        *,
        batch_index: int = 0,
        attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        kinds: Sequence[str] | None = None,
        layers: Sequence[int] | None = None,
        title: str = "Attention",
    ) -> Any:
        """The cached attention patterns (`hook_pattern`: encoder, decoder and cross-attention) of one example as
        an interactive page (`t5hooks.viz.AttentionView`: `_repr_html_`, `.save(path)`). `tokens` /
        `decoder_tokens`: ids (shown through the model's tokenizer) or strings, one per position; positions
        where a mask is 0 are hidden."""
        from ..viz.attention import attention_view, token_strings

        return attention_view(
            self.cache_dict,
            has_batch_dim=self.has_batch_dim,
            batch_index=batch_index,
            tokens={
                "encoder": token_strings(self.model, tokens, batch_index),
                "decoder": token_strings(self.model, decoder_tokens, batch_index),
            },
            masks={"encoder": attention_mask, "decoder": decoder_attention_mask},
            kinds=kinds,
            layers=layers,
            title=title,
        )

    # ---- logits --------------------------------------------------------------------------
    def _token_directions(self, tokens: str | int | Tensor) -> Tensor:  # [*token_shape, d_model]
        """Unembedding columns of `tokens` (a single-token string, an id, or an id tensor)."""
        if isinstance(tokens, str):
            tokenizer = self.model.tokenizer
            if tokenizer is None:
                raise ValueError(f"token {tokens!r} is text but the model has no tokenizer; pass token ids")
            ids = tokenizer.encode(tokens, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(
                    f"{tokens!r} is {len(ids)} tokens ({ids}); logit attribution needs one token per answer"
                )
            tokens = ids[0]
        tokens = torch.as_tensor(tokens, device=self.model.W_U.device)
        if tokens.is_floating_point():
            raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        return self.model.W_U.T[tokens.long()]

    def _slice_tokens(self, tokens: Any, pos_slice: SliceInput, batch_slice: SliceInput) -> Any:
        """Answer tokens `[batch]` / `[batch, pos]` of the whole run, cut to the slices of the residual stack
        (tokens already cut pass through; other row counts are an error, never a silent broadcast)."""
        if not isinstance(tokens, Tensor) or tokens.ndim == 0 or not self.has_batch_dim:
            return tokens
        full_batch, full_pos = self[act_name("decoder_embed")].shape[:2]  # [B, D, d_model]
        cut_batch = apply_slice(torch.arange(full_batch), batch_slice, dim=0).reshape(-1).numel()
        has_pos = tokens.ndim == 2
        if batch_slice is not None and tokens.shape[0] == full_batch:
            tokens = apply_slice(tokens, batch_slice, dim=0)
        elif tokens.shape[0] != cut_batch:
            raise ValueError(
                f"tokens have {tokens.shape[0]} rows; this cache's batch is {full_batch} ({cut_batch} after batch_slice)"
            )
        if has_pos and pos_slice is not None and tokens.shape[-1] == full_pos:
            tokens = apply_slice(tokens, pos_slice, dim=-1)
        return tokens

    def logit_attrs(
        self,
        residual_stack: Tensor,  # [components, *batch_and_pos, d_model]
        tokens: str | int | Tensor,
        incorrect_tokens: str | int | Tensor | None = None,
        pos_slice: SliceInput = None,
        batch_slice: SliceInput = None,
        has_batch_dim: bool = True,
    ) -> Tensor:  # [components, *batch_and_pos]
        """Direct logit attribution: each component's contribution to the logit of `tokens` (minus that of
        `incorrect_tokens`) through the decoder's true output path — final RMSNorm with the cached scale, T5's
        logit scaling, `W_U`. Components of `decompose_resid("decoder")` sum to the logit (difference) exactly.

        `tokens`: an id / single-token string (every position), `[batch]` (one per example, every position),
        or `[batch, pos]`. As TransformerLens: `pos_slice` is already applied to `residual_stack` and
        `batch_slice` is applied here (see `apply_ln_to_stack`); token tensors given for the whole batch (and,
        2-D, every position) are sliced the same way, so each row meets its own example's tokens.
        """
        tokens = self._slice_tokens(tokens, pos_slice, batch_slice)
        directions = self._token_directions(tokens)
        if incorrect_tokens is not None:
            wrong = self._token_directions(self._slice_tokens(incorrect_tokens, pos_slice, batch_slice))
            if wrong.shape != directions.shape:
                raise ValueError(
                    f"tokens and incorrect_tokens must have the same shape, got {tuple(directions.shape[:-1])} "
                    f"and {tuple(wrong.shape[:-1])}"
                )
            directions = directions - wrong
        normalised = self.apply_ln_to_stack(
            residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice, has_batch_dim=has_batch_dim
        )
        if (
            has_batch_dim
            and normalised.ndim == 4
            and directions.ndim == 2
            and directions.shape[0] == normalised.shape[1]
        ):
            directions = directions.unsqueeze(-2)  # one token per example, broadcast over positions
        try:
            return (normalised * directions).sum(-1)
        except RuntimeError as err:
            raise ValueError(
                f"token directions of shape {tuple(directions.shape[:-1])} do not broadcast against the residual "
                f"stack's {tuple(normalised.shape[1:-1])} (batch/pos dims after slicing)"
            ) from err
