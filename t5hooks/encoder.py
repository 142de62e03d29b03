"""The encoder half of a T5, shared by both models, and HookedT5Encoder, the encoder on its own.

`HookedT5Base` builds and runs the token embedding, the encoder blocks and the encoder's final norm
(hook names `hook_embed`, `encoder.{l}.…`, `encoder_final_ln.*`, `hook_encoder_out`), and holds what
does not depend on a decoder: input checking, the tokenizer helpers, device/dtype moves, stacked
weight views and loading. `HookedEncoderDecoder` (model.py) adds the decoder and unembedding;
`HookedT5Encoder` returns the encoder's last hidden state, the way diffusion pipelines use T5-XXL and
umT5 as text encoders (`T5EncoderModel` / `UMT5EncoderModel` / `MT5EncoderModel` checkpoints).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .analysis.cache import ActivationCache
from .analysis.factored_matrix import FactoredMatrix
from .components import RESID, Attention, EncoderBlock, RMSNorm, attention_context, result_hook
from .config import HookedT5Config
from .hook_points import HookedRootModule, HookIO, HookLayout, HookPoint, NameFilter, is_tracing

TextOrTokens = Union[Tensor, str, Sequence[str]]


class Embed(nn.Module):
    """Token embedding shared by encoder and decoder (T5's `shared`)."""

    def __init__(self, cfg: HookedT5Config) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))  # [d_vocab, d_model]

    def forward(self, tokens: Tensor) -> Tensor:  # [B,pos] -> [B,pos,d_model]
        return F.embedding(tokens, self.W_E)


def as_config(cfg: HookedT5Config | dict[str, Any]) -> HookedT5Config:
    """The model's own copy of `cfg` (moving or converting the model never changes the caller's config)."""
    if isinstance(cfg, dict):
        cfg = HookedT5Config.from_dict(cfg)
    if not isinstance(cfg, HookedT5Config):
        raise TypeError(f"cfg must be a HookedT5Config or dict, got {type(cfg).__name__}")
    return cfg.copy()


class HookedT5Base(HookedRootModule):
    """What both hooked T5 models share: the encoder stack and everything that is not the decoder.

    Subclasses build their modules in forward order between `build_encoder()` and `finish_init()`
    (hook_dict and capture outputs follow module order), and say which blocks they own through
    `blocks()`, `attention_layers()` and `_self_attns()`.
    """

    # Checkpoint weights (our names) a model class does not use: an encoder-only model drops the decoder.
    DISCARDED_PREFIXES: tuple[str, ...] = ()

    def build_encoder(self, cfg: HookedT5Config, tokenizer: Any) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint(RESID, stack="encoder")
        self.encoder = nn.ModuleList(EncoderBlock(cfg, layer) for layer in range(cfg.n_layers))
        self.encoder_final_ln = RMSNorm(cfg, stack="encoder")
        self.hook_encoder_out = HookPoint(RESID, stack="encoder")  # the last hidden state; what cross-attention reads

    def finish_init(self, move_to_device: bool) -> None:
        self.init_weights()
        if move_to_device and self.cfg.device is not None:
            self.to(self.cfg.device)
        self.setup()

    @classmethod
    def discards(cls, name: str) -> bool:
        """True for a (converted) checkpoint weight this model class does not use."""
        return name.startswith(cls.DISCARDED_PREFIXES)

    # ---- structure (overridden by models with a decoder) --------------------------------
    def blocks(self) -> list[nn.Module]:
        return list(self.encoder)

    def attention_layers(self) -> list[Attention]:
        return [b.attn for b in self.encoder]

    def _self_attns(self) -> list[Attention]:
        return [b.attn for b in self.encoder]

    def _mlps(self) -> list[nn.Module]:
        return [b.mlp for b in self.blocks()]

    # ---- construction ------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """T5's initialisation (as in Hugging Face), seeded by `cfg.seed` when set."""
        cfg = self.cfg
        gen = None
        if cfg.seed is not None and self.embed.W_E.device.type != "meta":
            gen = torch.Generator(device=self.embed.W_E.device).manual_seed(cfg.seed)
        f = cfg.initializer_factor

        def normal(t: Tensor, std: float) -> None:
            t.normal_(0.0, f * std, generator=gen)

        normal(self.embed.W_E, 1.0)
        unembed = getattr(self, "unembed", None)
        if unembed is not None and unembed.lm_head is not None:
            normal(unembed.lm_head, 1.0)
        inner = cfg.n_heads * cfg.d_head
        for attn in self.attention_layers():
            normal(attn.q_proj, (cfg.d_model * cfg.d_head) ** -0.5)
            normal(attn.k_proj, cfg.d_model**-0.5)
            normal(attn.v_proj, cfg.d_model**-0.5)
            normal(attn.o_proj, inner**-0.5)
            if attn.rel_bias_table is not None:
                normal(attn.rel_bias_table, cfg.d_model**-0.5)
        for mlp in self._mlps():
            if mlp.gate_proj is not None:
                normal(mlp.gate_proj, cfg.d_model**-0.5)
            normal(mlp.in_proj, cfg.d_model**-0.5)
            normal(mlp.out_proj, cfg.d_mlp**-0.5)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.w.fill_(f)

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Toggle `hook_result` (per-head attention outputs `[B,pos,H,d_model]`, memory hungry)."""
        self.cfg.use_attn_result = use_attn_result
        for attn in self.attention_layers():
            if use_attn_result and not hasattr(attn, "hook_result"):
                attn.hook_result = result_hook()
            elif not use_attn_result and hasattr(attn, "hook_result"):
                del attn.hook_result
        self.setup()

    # ---- forward -----------------------------------------------------------------------
    def encode(self, tokens: Tensor, attention_mask: Tensor | None = None, io: HookIO | None = None) -> Tensor:
        """Encoder stack: tokens `[B,E]` (mask `[B,E]`, 1 = real token) -> `hook_encoder_out` `[B,E,d_model]`."""
        B, E = tokens.shape
        mask = None if attention_mask is None else attention_mask.bool()
        resid = self.hook_embed(self.embed(tokens), io)
        attns = [block.attn for block in self.encoder]
        ctx = attention_context(attns[0], attns, E, E, mask, io, resid.device)
        for block in self.encoder:
            resid = block(resid, ctx, io)
        return self.hook_encoder_out(self.encoder_final_ln(resid, io), io)

    # ---- input handling ----------------------------------------------------------------
    def prepare_encoder_inputs(
        self, input: TextOrTokens, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Tokenize text (the mask then comes from the padding) and check tokens and mask; on the model's device."""
        tokens, text_mask = self._tokens_and_mask(input, "input")
        if attention_mask is None:
            attention_mask = text_mask
        attention_mask = self._check_mask(attention_mask, tokens, "one_zero_attention_mask")
        return tokens.to(self.embed.W_E.device), attention_mask

    def _tokens_and_mask(
        self, value: TextOrTokens, what: str, prepend_start: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(value, str) or (isinstance(value, (list, tuple)) and value and isinstance(value[0], str)):
            if self.tokenizer is None:
                raise ValueError(
                    f"{what} is text but this model has no tokenizer; pass token ids, or load with "
                    f"tokenizer=... (any Hugging Face tokenizer)"
                )
            tokens, mask = self._tokenize(value)
            if prepend_start:
                start = torch.full((tokens.shape[0], 1), self.cfg.decoder_start_token_id, dtype=tokens.dtype)
                tokens = torch.cat([start, tokens], dim=1)
                mask = torch.cat([torch.ones_like(start), mask], dim=1)
            return tokens.to(self.embed.W_E.device), mask.to(self.embed.W_E.device)
        return self._as_token_tensor(value, what), None

    def _as_token_tensor(self, value: Any, what: str, allow_ignore: bool = False) -> Tensor:
        if not isinstance(value, Tensor):
            try:
                value = torch.as_tensor(value)
            except Exception as err:
                raise TypeError(
                    f"{what} must be token ids (a LongTensor [batch, pos]) or text, got {type(value).__name__}"
                ) from err
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{what} must hold integer token ids, got dtype {value.dtype}")
        if value.ndim == 1:
            value = value.unsqueeze(0)
        if value.ndim != 2 or value.shape[1] == 0 or value.shape[0] == 0:
            raise ValueError(f"{what} must have shape [batch, pos] with batch, pos >= 1, got {tuple(value.shape)}")
        value = value.long()
        if not is_tracing():
            checked = value[value != -100] if allow_ignore else value
            if checked.numel() and (int(checked.min()) < 0 or int(checked.max()) >= self.cfg.d_vocab):
                extra = " (or -100 to ignore)" if allow_ignore else ""
                raise ValueError(
                    f"{what} has token ids in [{int(checked.min())}, {int(checked.max())}]; valid ids are "
                    f"0..{self.cfg.d_vocab - 1}{extra}"
                )
        return value

    def _check_mask(self, mask: Tensor | None, tokens: Tensor, what: str) -> Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, Tensor):
            mask = torch.as_tensor(mask)
        if mask.ndim == 1 and tokens.shape[0] == 1:
            mask = mask.unsqueeze(0)
        if mask.shape != tokens.shape:
            raise ValueError(f"{what} has shape {tuple(mask.shape)}; it must match the tokens' {tuple(tokens.shape)}")
        if mask.is_floating_point() and not is_tracing():
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"{what} must hold only 0 and 1 (1 = attend)")
        return mask.to(self.embed.W_E.device)

    # ---- tokenizer ---------------------------------------------------------------------
    def _tokenize(self, text: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        batch = [text] if isinstance(text, str) else list(text)
        out = self.tokenizer(batch, return_tensors="pt", padding=True)
        return out["input_ids"].long(), out["attention_mask"].long()

    def to_tokens(self, input: str | Sequence[str], move_to_device: bool = True) -> Tensor:
        """Text -> token ids `[batch, pos]` (padded with the pad token; the tokenizer adds EOS as T5 expects)."""
        if self.tokenizer is None:
            raise ValueError("to_tokens needs a tokenizer: load the model with tokenizer=...")
        tokens, _ = self._tokenize(input)
        return tokens.to(self.embed.W_E.device) if move_to_device else tokens

    def to_string(self, tokens: Tensor | Sequence[int]) -> str | list[str]:
        """Token ids -> text (a list of strings for a batch)."""
        if self.tokenizer is None:
            raise ValueError("to_string needs a tokenizer: load the model with tokenizer=...")
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return [self.tokenizer.decode(row.tolist()) for row in tokens]
        return self.tokenizer.decode(tokens.tolist())

    def to_str_tokens(self, input: str | Tensor | Sequence[int]) -> list[str]:
        """One string per token, for labelling plots."""
        if self.tokenizer is None:
            raise ValueError("to_str_tokens needs a tokenizer: load the model with tokenizer=...")
        if isinstance(input, str):
            tokens = self.to_tokens(input, move_to_device=False)[0]
        else:
            tokens = torch.as_tensor(input)
            if tokens.ndim == 2:
                if tokens.shape[0] != 1:
                    raise ValueError(f"to_str_tokens takes one sequence, got a batch of {tokens.shape[0]}")
                tokens = tokens[0]
        label = getattr(self.tokenizer, "str_tokens", None)  # a tokenizer that labels its own tokens
        if callable(label):
            return label(tokens.tolist())
        return [self.tokenizer.decode([t]) for t in tokens.tolist()]

    # ---- caching -----------------------------------------------------------------------
    def run_with_cache(
        self, *model_args: Any, return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs: Any
    ) -> tuple[Any, ActivationCache | dict[str, Tensor]]:
        """Run and cache activations (`names_filter`: names, globs or predicate; `device`; `remove_batch_dim`)."""
        out, cache = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        if return_cache_object:
            return out, ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache

    # ---- loading -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        *,
        hf_model: Any = None,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ):
        """Load a T5-family checkpoint: a Hugging Face hub name, a local `save_pretrained` directory (`subfolder=`
        for a diffusers pipeline's `text_encoder_2/`), a safetensors / GGUF file, or a live HF model (`hf_model=`).
        `fold_ln=True` folds the RMSNorm weights into the following weights after loading (see `fold_ln`).
        `HookedEncoderDecoder` refuses an encoder-only checkpoint (a diffusion pipeline's text encoder) with a
        pointer to `HookedT5Encoder`."""
        from .loading import load_pretrained
        from .pretrained import is_builtin, load_builtin

        fold_ln = kwargs.pop("fold_ln", False)
        if hf_model is None and is_builtin(model_name):
            model = load_builtin(cls, model_name, device=device, dtype=dtype, **kwargs)
        else:
            model = load_pretrained(
                cls, model_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype, **kwargs
            )
        if fold_ln:
            model.fold_ln()
        return model

    def to(self, *args: Any, **kwargs: Any):
        """nn.Module.to (`print_details` is accepted, as TL)."""
        kwargs.pop("print_details", None)
        return super().to(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True):
        """Every move or conversion (`to`, `half`, `bfloat16`, `float`, `cuda`, ...) keeps the run options
        `cfg.device` / `cfg.dtype` in step with the weights (`cfg` is the model's own copy)."""
        result = super()._apply(fn, recurse)
        self.cfg.device = str(self.embed.W_E.device)
        self.cfg.dtype = self.embed.W_E.dtype
        return result

    def cpu(self):
        return self.to("cpu")

    def cuda(self, device: int | str | torch.device | None = None):
        return self.to(
            torch.device("cuda")
            if device is None
            else torch.device("cuda", device)
            if isinstance(device, int)
            else device
        )

    def mps(self):
        return self.to("mps")

    # ---- weights, TransformerLens names --------------------------------------------------
    @property
    def W_E(self) -> Tensor:  # [d_vocab, d_model]
        return self.embed.W_E

    @property
    def W_pos(self) -> None:
        """None: T5 has no absolute positional embedding. Its relative position bias tables are
        `encoder[0].attn.rel_bias_table` (and `decoder[0]`'s), `[num_buckets, n_heads]`; UMT5 has one per layer."""
        return None

    # Self-attention weights, stacked over this model's self-attention layers (encoder, then decoder).
    W_Q = property(lambda self: torch.stack([a.W_Q for a in self._self_attns()]))  # [L,H,d_model,d_head]
    W_K = property(lambda self: torch.stack([a.W_K for a in self._self_attns()]))  # [L,H,d_model,d_head]
    W_V = property(lambda self: torch.stack([a.W_V for a in self._self_attns()]))  # [L,H,d_model,d_head]
    W_O = property(lambda self: torch.stack([a.W_O for a in self._self_attns()]))  # [L,H,d_head,d_model]
    b_Q = property(lambda self: torch.stack([a.b_Q for a in self._self_attns()]))  # [L,H,d_head]
    b_K = property(lambda self: torch.stack([a.b_K for a in self._self_attns()]))
    b_V = property(lambda self: torch.stack([a.b_V for a in self._self_attns()]))
    b_O = property(lambda self: torch.stack([a.b_O for a in self._self_attns()]))  # [L,d_model]
    # MLPs, encoder then decoder.
    W_in = property(lambda self: torch.stack([m.W_in for m in self._mlps()]))  # [L,d_model,d_mlp]
    W_out = property(lambda self: torch.stack([m.W_out for m in self._mlps()]))  # [L,d_mlp,d_model]
    b_in = property(lambda self: torch.stack([m.b_in for m in self._mlps()]))  # [L,d_mlp]
    b_out = property(lambda self: torch.stack([m.b_out for m in self._mlps()]))  # [L,d_model]

    @property
    def W_gate(self) -> Tensor | None:  # [L,d_model,d_mlp]; None for ungated (v1.0) MLPs
        if not self.cfg.gated_mlp:
            return None
        return torch.stack([m.W_gate for m in self._mlps()])

    @property
    def QK(self) -> FactoredMatrix:  # [L,H,d_model,d_model] self-attention query-key circuits
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:  # [L,H,d_model,d_model] self-attention output-value circuits
        return FactoredMatrix(self.W_V, self.W_O)


class HookedT5Encoder(HookedT5Base):
    """A T5-family encoder alone (T5 / T5 v1.1 / Flan / mT5 / UMT5 / ByT5), with the hook points and
    explicit-output capture of `HookedEncoderDecoder`'s encoder half.

    `model(input, one_zero_attention_mask)` returns the last hidden state `[B,E,d_model]` (what
    `T5EncoderModel` returns, and what a diffusion pipeline conditions on). Load with
    `HookedT5Encoder.from_pretrained(...)` from an encoder-only checkpoint, a full encoder-decoder one (the
    decoder is dropped), a diffusers pipeline directory with `subfolder="text_encoder_2"`, or `hf_model=`.
    """

    DISCARDED_PREFIXES = ("decoder.", "decoder_final_ln.", "unembed.")

    def __init__(self, cfg: HookedT5Config, tokenizer: Any = None, move_to_device: bool = True) -> None:
        super().__init__()
        self.build_encoder(as_config(cfg), tokenizer)
        self.finish_init(move_to_device)

    @classmethod
    def reference_layout(cls) -> HookLayout:
        """The hook layout with every optional point on (gated MLP, `use_attn_result`), from a tiny model."""
        return _reference_encoder_layout()

    def _name_hint(self, name: str) -> str:
        if name.startswith(("decoder", "hook_decoder_embed", "unembed")):
            return "(HookedT5Encoder has only the encoder; use HookedEncoderDecoder for decoder hook points)"
        return super()._name_hint(name)

    def forward(
        self,
        input: TextOrTokens,
        one_zero_attention_mask: Tensor | None = None,
        return_type: Literal["last_hidden_state"] | None = "last_hidden_state",
    ) -> Tensor | None:
        """Run the encoder. `input`: tokens `[B,E]`, a string or a list of strings (needs a tokenizer);
        `one_zero_attention_mask` `[B,E]`, 1 = attend (derived from padding for strings). Returns the last
        hidden state `[B,E,d_model]` (= `hook_encoder_out`), or None with `return_type=None`."""
        if return_type not in ("last_hidden_state", None):
            raise ValueError(f"return_type={return_type!r}; valid: 'last_hidden_state', None")
        tokens, mask = self.prepare_encoder_inputs(input, one_zero_attention_mask)
        out = self.encode(tokens, mask)
        return out if return_type is not None else None

    def capture(
        self,
        names: NameFilter,
        patch: NameFilter = (),
        patch_mode: str | dict[str, str] = "replace",
        intervene: dict[str, nn.Module] | None = None,
    ):
        """A module sharing these weights that returns `{"last_hidden_state", *names}` (see capture.py);
        `intervene={hook name: module}` splices modules in, their side outputs named `"<hook name>.<output>"`."""
        from .capture import EncoderCaptureModule

        return EncoderCaptureModule(self, names, patch=patch, patch_mode=patch_mode, intervene=intervene)

    def fold_ln(self) -> HookedT5Encoder:
        """Fold each block's RMSNorm weights into the weights that read them (see analysis/fold.py). The final
        norm has no reader here and stays, so `last_hidden_state` is unchanged. Returns self."""
        from .analysis.fold import fold_encoder_norms

        fold_encoder_norms(self)
        return self

    def all_head_labels(self) -> list[str]:
        """ "L{l}H{h}" per encoder head, in the order of the stacked weights."""
        return [f"L{layer}H{head}" for layer in range(self.cfg.n_layers) for head in range(self.cfg.n_heads)]


@functools.cache
def _reference_encoder_layout() -> HookLayout:
    cfg = HookedT5Config(
        d_model=8, d_head=4, n_heads=2, d_mlp=8, n_layers=2, d_vocab=8, gated_mlp=True, use_attn_result=True
    )
    return HookedT5Encoder(cfg).layout
