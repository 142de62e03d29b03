"""A HookedT5Encoder as the text encoder of a diffusers pipeline (PixArt-α/Σ, SD3, Flux, Wan, ...).

`encoder.as_text_encoder()` returns a `T5TextEncoder`: exactly the surface diffusion pipelines use on a
`T5EncoderModel` (`input_ids`, `attention_mask`, `output_hidden_states`, `return_dict`; a `BaseModelOutput`;
`.dtype`, `.device`, `.config`, `requires_grad_`, `to`). Every call runs the encoder's own forward through a
capture module (capture.py), so Python hooks (`encoder.hooks(...)`), spliced modules (`intervene=`) and
steering vectors (`steer=`) act inside `pipe(...)` as they do outside it, once per encoder call:

    te = encoder.as_text_encoder(intervene={hook: sae}, steer={hook: vector})   # fixed edits (exportable)
    pipe.text_encoder = te
    with te.capturing(names, intervene=..., steer=...) as record:               # edits for one block
        pipe(prompt, negative_prompt=...)
    record.calls            # one EncoderCall per encoder call (prompt, negative prompt): [B, E, ...] + masks
    record.for_text(text)   # that prompt's activations `[E, ...]` with its padding mask
    with te.lens(layer):    # the diffusion lens: layer `layer` through the final norm as the prompt_embeds
        pipe(prompt)
    diffusion_lens(pipe, prompt)   # {layer: pipe.encode_prompt(prompt)} from one encoder forward
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .capture import EncoderCaptureModule
from .hook_io import NameFilter

# Keyword arguments of T5EncoderModel.forward that a T5TextEncoder refuses (what they would need instead).
REFUSED = {
    "inputs_embeds": "token ids (input_ids); to change the embeddings, patch or hook `hook_embed`",
    "output_attentions": "capture `encoder.*.attn.hook_pattern` with text_encoder.capturing(...)",
}
MAX_CACHED_CAPTURES = 16


def check_call(
    who: str, input_ids: Tensor | None, refused: dict[str, tuple[Any, str]], kwargs: dict[str, Any], takes: str
) -> None:
    """The part of `T5EncoderModel`'s call signature that `who` does not support is an error, not ignored:
    `refused` maps an argument to (its value, what to do instead); unknown keywords and missing ids too."""
    for name, (value, instead) in refused.items():
        if value is not None and value is not False:
            raise ValueError(f"{who} does not take {name}; {instead}")
    if kwargs:
        raise TypeError(f"{who} got unexpected arguments {sorted(kwargs)}; it takes {takes}")
    if input_ids is None:
        raise ValueError(f"{who} needs input_ids (token ids [batch, pos])")


@dataclass
class PromptActivations:
    """One prompt of one encoder call: every position's activations `[E, ...]` and the prompt's padding mask."""

    call: int  # index of the encoder call in the record
    row: int  # row of that call's batch
    input_ids: Tensor  # [E]
    padding_mask: Tensor  # [E] 1 = a real token
    activations: dict[str, Tensor]  # name -> [E, ...] (positions first) or the activation's own layout
    position_axis: dict[str, bool] = field(repr=False, default_factory=dict)  # name -> axis 0 counts positions

    def real(self, name: str) -> Tensor:
        """The activation at the real tokens only: `[n_real, ...]`."""
        if name not in self.activations:
            raise KeyError(f"{name!r} was not recorded; recorded: {sorted(self.activations)}")
        if not self.position_axis.get(name, False):
            raise ValueError(f"{name!r} has no position axis first (shape {tuple(self.activations[name].shape)})")
        value = self.activations[name]
        return value[self.padding_mask.to(value.device).bool()]


@dataclass
class EncoderCall:
    """One call of the text encoder during a pipeline run (the prompt batch, or the negative prompt batch)."""

    index: int
    input_ids: Tensor  # [B, E]
    attention_mask: Tensor | None  # [B, E] as the pipeline passed it; None: it passed none (all positions attended)
    padding_mask: Tensor  # [B, E] 1 = real token: the attention mask, or without one `input_ids != pad_token_id`
    activations: dict[str, Tensor]  # name -> [B, E, ...] (attention maps: [B, H, E, E])
    position_axis: dict[str, bool] = field(repr=False, default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def prompt(self, row: int) -> PromptActivations:
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} out of range for an encoder call of {len(self)} prompts")
        return PromptActivations(
            self.index,
            row % len(self),
            self.input_ids[row],
            self.padding_mask[row],
            {name: value[row] for name, value in self.activations.items()},
            self.position_axis,
        )


class EncoderRecord:
    """What `T5TextEncoder.capturing(...)` recorded: one `EncoderCall` per encoder call, in call order."""

    def __init__(self, names: Sequence[str], tokenizer: Any, pad_token_id: int) -> None:
        self.names = tuple(names)
        self.calls: list[EncoderCall] = []
        self._tokenizer = tokenizer
        self._pad = pad_token_id

    def __repr__(self) -> str:
        return f"EncoderRecord({len(self.calls)} calls, names={list(self.names)})"

    def prompts(self) -> list[PromptActivations]:
        """Every prompt of every call, in call order."""
        return [call.prompt(row) for call in self.calls for row in range(len(call))]

    def for_text(self, text: str) -> list[PromptActivations]:
        """The recorded prompts whose real tokens are `text`'s (tokenized with the encoder's tokenizer, special
        tokens added, as pipelines do), in call order. Pipelines may rewrite a prompt before tokenizing it
        (PixArt lower-cases it): pass the text as it was tokenized. KeyError (listing what was recorded) if none."""
        if self._tokenizer is None:
            raise ValueError("for_text needs the encoder's tokenizer (encoder.set_tokenizer(pipe.tokenizer))")
        wanted = list(self._tokenizer(text, add_special_tokens=True)["input_ids"])
        found = [p for p in self.prompts() if p.input_ids[p.padding_mask.bool()].tolist() == wanted]
        if not found:
            seen = [self._tokenizer.decode(p.input_ids[p.padding_mask.bool()].tolist()) for p in self.prompts()]
            raise KeyError(f"no recorded prompt tokenizes as {text!r} ({wanted}); recorded: {seen}")
        return found

    def add(self, tokens: Tensor, attention_mask: Tensor | None, out: Mapping[str, Tensor], keep: Callable) -> None:
        padding = attention_mask if attention_mask is not None else (tokens != self._pad)
        activations, axis = {}, {}
        for name, value in out.items():
            first = keep(name)
            if first is None:
                continue
            activations[name] = value.detach()
            axis[name] = first
        self.calls.append(
            EncoderCall(
                len(self.calls),
                tokens.detach(),
                None if attention_mask is None else attention_mask.detach(),
                padding.long().detach(),
                activations,
                axis,
            )
        )


@dataclass
class _Session:
    names: tuple[str, ...]
    intervene: dict[str, nn.Module]
    steer: dict[str, Tensor]
    record: EncoderRecord


@dataclass
class _Lens:
    layers: tuple[int, ...]  # the readouts one forward computes
    layer: int  # the one the forward returns
    memo: dict[Any, dict[str, Any]] | None = None  # per distinct input: the readouts (a sweep: one forward)


class T5TextEncoder(nn.Module):
    """`HookedT5Encoder` behind `T5EncoderModel`'s call surface, for diffusers pipelines (see the module doc).

    `intervene={hook name: module}` and `steer={hook name or glob: vector}` are fixed edits active in every call
    (and exported with it); `capturing(...)` adds edits and records activations for one block of code.
    `config`: the transformers config the pipeline sees (default: built from the encoder's config).
    """

    main_input_name = "input_ids"

    def __init__(
        self,
        model: nn.Module,
        *,
        intervene: Mapping[str, nn.Module] | None = None,
        steer: Mapping[str, Tensor] | None = None,
        config: Any = None,
    ) -> None:
        super().__init__()
        self.model = model  # a submodule: `to`, `requires_grad_`, `parameters` reach the encoder's weights
        intervene = self._checked_intervene(intervene)
        self.intervene_names: tuple[str, ...] = tuple(intervene)
        self.interventions = nn.ModuleList(intervene.values())  # move and train with the text encoder
        steer = self._checked_steer(steer)
        self.steer_names: tuple[str, ...] = tuple(steer)
        for i, vector in enumerate(steer.values()):
            self.register_buffer(f"steer_{i}", vector.detach().clone())
        self._hf_config = config
        self._sessions: list[_Session] = []
        self._lens: _Lens | None = None
        self._captures: dict[Any, EncoderCaptureModule] = {}

    # ---- what pipelines read ----------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.model.W_E.dtype

    @property
    def device(self) -> torch.device:
        return self.model.W_E.device

    @property
    def config(self) -> Any:
        """A transformers `T5Config` / `MT5Config` / `UMT5Config` describing the encoder (pipelines read
        `d_model`, `model_type`, ...)."""
        if self._hf_config is None:
            self._hf_config = transformers_config(self.model.cfg)
        return self._hf_config

    @property
    def intervene(self) -> dict[str, nn.Module]:
        """The fixed interventions `{hook name: module}`."""
        return dict(zip(self.intervene_names, self.interventions))

    @property
    def steer(self) -> dict[str, Tensor]:
        """The fixed steering vectors `{hook name: vector}` (added to the activation)."""
        return {name: getattr(self, f"steer_{i}") for i, name in enumerate(self.steer_names)}

    def extra_repr(self) -> str:
        return f"intervene={list(self.intervene_names)}, steer={list(self.steer_names)}"

    # ---- the call ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """`T5EncoderModel`'s call: token ids `[B, E]`, an optional mask `[B, E]` (1 = attend; without one every
        position is attended, padding included, as T5EncoderModel does). Returns a `BaseModelOutput` with
        `last_hidden_state` `[B, E, d_model]` and, with `output_hidden_states`, `hidden_states`: the embeddings,
        each layer's output and the final normed output (T5EncoderModel's L + 1 tensors); a tuple with
        `return_dict=False`."""
        from transformers.modeling_outputs import BaseModelOutput

        check_call(
            "T5TextEncoder",
            input_ids,
            {
                "inputs_embeds": (inputs_embeds, f"use {REFUSED['inputs_embeds']}"),
                "output_attentions": (output_attentions, f"use {REFUSED['output_attentions']}"),
            },
            kwargs,
            takes="input_ids, attention_mask, output_hidden_states, return_dict",
        )
        tokens = input_ids.to(self.device)
        mask = attention_mask.to(self.device) if attention_mask is not None else torch.ones_like(tokens)
        hidden = bool(output_hidden_states)
        lens = self._lens
        key = _input_key(tokens, attention_mask, hidden) if lens is not None and lens.memo is not None else None
        if key is not None and key in lens.memo:  # a lens sweep: this input's readouts are known (no encoder call)
            out = lens.memo[key]
        else:
            out = self._run(tokens, mask, attention_mask, hidden, lens)
            if key is not None:
                lens.memo[key] = out
        last = out[_readout_key(lens.layer)] if lens is not None else out["last_hidden_state"]
        hidden_states = None
        if hidden:
            n = self.model.cfg.n_layers
            layers = tuple(out[f"encoder.{layer}.hook_resid_post"] for layer in range(n - 1))
            hidden_states = (out["hook_embed"], *layers, out["last_hidden_state"])
        result = BaseModelOutput(last_hidden_state=last, hidden_states=hidden_states)
        return result.to_tuple() if return_dict is False else result

    def _run(
        self, tokens: Tensor, mask: Tensor, given_mask: Tensor | None, hidden: bool, lens: _Lens | None
    ) -> dict[str, Tensor]:
        """One encoder forward with every active edit; records into the active sessions."""
        intervene, steer = self._active_edits()
        recorded = {name for s in self._sessions for name in s.names}
        wanted = set(recorded)
        if hidden:
            wanted |= {
                "hook_embed",
                *(f"encoder.{layer}.hook_resid_post" for layer in range(self.model.cfg.n_layers - 1)),
            }
        if lens is not None:
            wanted |= {f"encoder.{layer}.hook_resid_post" for layer in lens.layers}
        names = tuple(name for name in self.model.hook_dict if name in wanted)
        cap = self._capture(names, tuple(steer), intervene)
        out = dict(cap(tokens, mask, steer or None))
        if lens is not None:
            norm = self.model.encoder_final_ln
            for layer in lens.layers:
                out[_readout_key(layer)] = norm(out[f"encoder.{layer}.hook_resid_post"], hooked=False)
        side = tuple(f"{hook}." for hook in intervene)
        layout = self.model.layout
        for session in self._sessions:

            def keep(name: str, names: tuple[str, ...] = session.names) -> bool | None:
                if name in names:
                    axes = layout.spec(name).axes or ()
                    return len(axes) > 1 and axes[1] == "pos"
                if name.startswith(side):  # interventions' side outputs ([B, E, ...]: SAE features)
                    return True
                return None

            session.record.add(tokens, given_mask, out, keep)
        return out

    def _capture(
        self, names: tuple[str, ...], steer_names: tuple[str, ...], intervene: dict[str, nn.Module]
    ) -> EncoderCaptureModule:
        """The capture module for this set of names and edits (cached; they share the encoder's weights)."""
        key = (names, steer_names, tuple((name, id(module)) for name, module in intervene.items()))
        cap = self._captures.get(key)
        if cap is None:
            if len(self._captures) >= MAX_CACHED_CAPTURES:
                self._captures.clear()
            cap = self.model.capture(list(names), patch=list(steer_names), patch_mode="add", intervene=intervene)
            self._captures[key] = cap
        return cap

    # ---- edits and records ------------------------------------------------------------------------
    @contextlib.contextmanager
    def capturing(
        self,
        names: NameFilter = (),
        *,
        intervene: Mapping[str, nn.Module] | None = None,
        steer: Mapping[str, Tensor] | None = None,
    ) -> Iterator[EncoderRecord]:
        """Inside the block, every encoder call (the prompt's, the negative prompt's) records the activations
        `names` select (names, globs or a predicate) and runs with `intervene` / `steer` added to the fixed edits;
        interventions' side outputs (SAE `features`) are recorded too. Yields the `EncoderRecord`."""
        resolved = tuple(self.model.resolve_names(names)) if _nonempty(names) else ()
        session = _Session(
            resolved,
            self._checked_intervene(intervene),
            self._checked_steer(steer),
            EncoderRecord(resolved, self.model.tokenizer, self.model.cfg.pad_token_id),
        )
        self._sessions.append(session)
        try:
            self._active_edits()  # refuses two edits of one hook before anything runs
        except ValueError:
            self._sessions.remove(session)
            raise
        try:
            yield session.record
        finally:
            self._sessions.remove(session)

    @contextlib.contextmanager
    def lens(self, layer: int) -> Iterator[None]:
        """The diffusion lens (Toker et al., 2024): inside the block the text encoder returns layer `layer`'s
        output (`encoder.{layer}.hook_resid_post`) through the encoder's final RMSNorm, for every call (prompt and
        negative prompt), so the pipeline draws what that layer "says". The last layer gives the usual output."""
        with self._lens_state((self._checked_layer(layer),), memo=False):
            yield

    @contextlib.contextmanager
    def _lens_state(self, layers: tuple[int, ...], memo: bool) -> Iterator[_Lens]:
        if self._lens is not None:
            raise RuntimeError("a diffusion lens is already active on this text encoder")
        self._lens = _Lens(layers, layers[0], {} if memo else None)
        try:
            yield self._lens
        finally:
            self._lens = None

    def _active_edits(self) -> tuple[dict[str, nn.Module], dict[str, Tensor]]:
        """The fixed edits plus those of every active `capturing` block; one edit of each kind per hook."""
        intervene, steer = self.intervene, self.steer
        for session in self._sessions:
            for edits, new in ((intervene, session.intervene), (steer, session.steer)):
                twice = sorted(set(edits) & set(new))
                if twice:
                    raise ValueError(f"{twice} already carry an edit of this kind on this text encoder")
                edits.update(new)
        return (
            {n: intervene[n] for n in self.model.hook_dict if n in intervene},
            {n: steer[n] for n in self.model.hook_dict if n in steer},
        )

    def _checked_intervene(self, intervene: Mapping[str, nn.Module] | None) -> dict[str, nn.Module]:
        """Exact hook names with nn.Modules (as `capture(intervene=...)` takes them)."""
        out = {}
        for name, module in (intervene or {}).items():
            if not isinstance(name, str) or name not in self.model.hook_dict:
                self.model.resolve_names([name])  # unknown: raises with close valid names
                raise ValueError(f"intervene keys must be exact hook names, not patterns: {name!r}")
            if not isinstance(module, nn.Module):
                raise TypeError(f"intervene[{name!r}] must be an nn.Module, got {type(module).__name__}")
            out[name] = module
        return out

    def _checked_steer(self, steer: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """`{name or glob: vector}` -> `{hook name: vector}`; a vector broadcasts to the activation (`[d_model]`)."""
        out: dict[str, Tensor] = {}
        for pattern, vector in (steer or {}).items():
            if not isinstance(vector, Tensor) or not vector.is_floating_point():
                raise TypeError(f"steer[{pattern!r}] must be a floating-point tensor, got {type(vector).__name__}")
            for name in self.model.resolve_names(pattern):
                if name in out:
                    raise ValueError(f"steer gives {name!r} two vectors (patterns overlap)")
                axes = self.model.layout.spec(name).axes
                if axes is not None and vector.ndim > len(axes):
                    raise ValueError(f"steer[{pattern!r}] has {vector.ndim} axes; {name!r} has {len(axes)} {axes}")
                out[name] = vector
        return out

    def _checked_layer(self, layer: int) -> int:
        n = self.model.cfg.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
            raise ValueError(f"layer={layer!r}; this encoder has layers 0..{n - 1} (negative counts from the end)")
        return layer % n


def diffusion_lens(
    pipe: Any, prompt: str | Sequence[str], layers: Sequence[int] | None = None, **encode_prompt_kwargs: Any
) -> dict[int, Any]:
    """Per-layer prompt embeddings: `{layer: pipe.encode_prompt(prompt, **encode_prompt_kwargs)}` with the pipeline's
    T5TextEncoder reading out `layer` through the final norm (see `T5TextEncoder.lens`), for every layer (default)
    or `layers`. The encoder runs once per distinct input (prompt, negative prompt) for all layers. Each value is
    what that pipeline's `encode_prompt` returns (PixArt: embeddings, mask, negative embeddings, negative mask;
    Flux: embeddings, pooled CLIP embeddings, text ids), ready for `pipe(prompt_embeds=..., ...)`. Runs without
    gradients."""
    te = _pipeline_text_encoder(pipe)
    n = te.model.cfg.n_layers
    chosen = tuple(range(n)) if layers is None else tuple(te._checked_layer(layer) for layer in layers)
    if not chosen:
        raise ValueError("layers is empty; pass layer indices or None for every layer")
    result = {}
    with torch.no_grad(), te._lens_state(tuple(sorted(set(chosen))), memo=True) as state:
        for layer in chosen:
            state.layer = layer
            result[layer] = pipe.encode_prompt(prompt, **encode_prompt_kwargs)
    return result


def _pipeline_text_encoder(pipe: Any) -> T5TextEncoder:
    """The pipeline's one T5TextEncoder component."""
    components = getattr(pipe, "components", None)
    if not isinstance(components, Mapping):
        raise TypeError(f"expected a diffusers pipeline, got {type(pipe).__name__}")
    found = [name for name, value in components.items() if isinstance(value, T5TextEncoder)]
    if len(found) != 1:
        raise ValueError(
            f"the pipeline has {len(found)} T5TextEncoder components {found}; plug one in "
            f"(pipe.text_encoder_2 = encoder.as_text_encoder())"
        )
    return components[found[0]]


def transformers_config(cfg: Any) -> Any:
    """A transformers config (`T5Config`, `MT5Config` or `UMT5Config`) with the encoder's sizes and options."""
    import transformers

    if cfg.per_layer_position_bias:
        config_cls, architecture = transformers.UMT5Config, "UMT5EncoderModel"
    elif cfg.original_architecture.startswith("MT5"):
        config_cls, architecture = transformers.MT5Config, "MT5EncoderModel"
    else:
        config_cls, architecture = transformers.T5Config, "T5EncoderModel"
    if cfg.gated_mlp:  # transformers reads "gated-gelu" as the tanh GELU (gelu_new); dense_act_fn is set below
        feed_forward = "gated-gelu" if cfg.act_fn in ("gelu", "gelu_new") else f"gated-{cfg.act_fn}"
    else:
        feed_forward = cfg.act_fn
    config = config_cls(
        vocab_size=cfg.d_vocab,
        d_model=cfg.d_model,
        d_kv=cfg.d_head,
        d_ff=cfg.d_mlp,
        num_layers=cfg.n_layers,
        num_decoder_layers=cfg.n_decoder_layers,
        num_heads=cfg.n_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.layer_norm_eps,
        feed_forward_proj=feed_forward,
        dropout_rate=0.0,
        pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id,
        decoder_start_token_id=cfg.decoder_start_token_id,
        architectures=[architecture],
    )
    config.dense_act_fn = cfg.act_fn
    return config


def _readout_key(layer: int) -> str:
    return f"lens.{layer}"


def _input_key(tokens: Tensor, mask: Tensor | None, hidden: bool) -> tuple:
    def raw(t: Tensor | None) -> Any:
        return None if t is None else (tuple(t.shape), t.detach().cpu().numpy().tobytes())

    return raw(tokens), raw(mask), hidden


def _nonempty(names: NameFilter) -> bool:
    return names is not None and (callable(names) or isinstance(names, str) or len(names) > 0)
