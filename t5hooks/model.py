"""HookedEncoderDecoder: a T5 encoder-decoder with a hook point on every interesting activation."""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from collections.abc import Sequence
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .analysis.cache import ActivationCache
from .analysis.factored_matrix import FactoredMatrix
from .components import (
    RESID,
    Attention,
    DecoderBlock,
    EncoderBlock,
    RMSNorm,
    attention_context,
    lm_loss,
    optional_hook,
)
from .config import HookedT5Config
from .hook_points import HookedRootModule, HookIO, HookLayout, HookPoint, NameFilter, is_tracing, set_default_layout
from .kv_cache import DecoderCache

TextOrTokens = Union[Tensor, str, Sequence[str]]


def _caller_stacklevel() -> int:
    """The `warnings.warn` stacklevel of the first frame outside t5hooks and torch (the user's call)."""
    import sys
    from pathlib import Path

    inside = (str(Path(__file__).resolve().parent), str(Path(torch.__file__).resolve().parent))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """None -> float32 (the reference's default); "bfloat16" / "torch.float16" strings accepted."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; valid: float32, float16, bfloat16, float64")
        return value
    return dtype


RETURN_TYPES = ("logits", "loss", "both", None)


class Embed(nn.Module):
    """Token embedding shared by encoder and decoder (T5's `shared`)."""

    def __init__(self, cfg: HookedT5Config) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))  # [d_vocab, d_model]

    def forward(self, tokens: Tensor) -> Tensor:  # [B,pos] -> [B,pos,d_model]
        return F.embedding(tokens, self.W_E)


class Unembed(nn.Module):
    """Logits from the final decoder residual: optional `d_model**-0.5` scaling, then `W_U`.

    With tied embeddings there is no weight here: the model passes `W_E` in.
    """

    def __init__(self, cfg: HookedT5Config) -> None:
        super().__init__()
        self.scale = cfg.d_model**-0.5 if cfg.scale_logits else None
        self.lm_head = (
            None if cfg.tie_word_embeddings else nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))
        )  # [d_vocab, d_model], HF lm_head layout
        self.hook_in = HookPoint(("batch", "pos", "d_model"), stack="decoder", alias="unembed_in")  # after scaling
        self.hook_out = HookPoint(("batch", "pos", "d_vocab"), stack="decoder")  # the logits

    def forward(self, resid: Tensor, tied_weight: Tensor, io: HookIO | None = None) -> Tensor:
        if self.scale is not None:
            resid = resid * self.scale
        resid = self.hook_in(resid, io)
        return self.hook_out(F.linear(resid, tied_weight if self.lm_head is None else self.lm_head), io)


class HookedEncoderDecoder(HookedRootModule):
    """T5-family encoder-decoder with TransformerLens-style hooks and explicit-output capture.

    Build with random weights from a config (`HookedEncoderDecoder(cfg)`), or load with
    `HookedEncoderDecoder.from_pretrained(name_or_path)`. Hook names are in `model.hook_dict`.
    """

    def __init__(self, cfg: HookedT5Config, tokenizer: Any = None, move_to_device: bool = True, **kwargs: Any) -> None:
        """`kwargs` override fields of `cfg` (e.g. `use_attn_result=True`), as the reference's `**kwargs`."""
        super().__init__()
        if isinstance(cfg, dict):
            cfg = HookedT5Config.from_dict({**cfg, **kwargs})
        elif isinstance(cfg, HookedT5Config) and kwargs:
            cfg = HookedT5Config.from_dict(
                {**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, **kwargs}
            )
        if not isinstance(cfg, HookedT5Config):
            raise TypeError(f"cfg must be a HookedT5Config or dict, got {type(cfg).__name__}")
        cfg = cfg.copy()  # the model's own: moving or converting it never changes the caller's config
        self.cfg = cfg
        self.tokenizer = tokenizer
        # Modules are defined in forward order, so hook_dict (and capture outputs) follow the computation.
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint(RESID, stack="encoder")
        self.encoder = nn.ModuleList(EncoderBlock(cfg, layer) for layer in range(cfg.n_layers))
        self.encoder_final_ln = RMSNorm(cfg, stack="encoder")
        self.hook_encoder_out = HookPoint(RESID, stack="encoder")  # what cross-attention reads
        self.hook_decoder_embed = HookPoint(RESID, stack="decoder", alias="embed")
        self.decoder = nn.ModuleList(DecoderBlock(cfg, layer) for layer in range(cfg.n_decoder_layers))
        self.decoder_final_ln = RMSNorm(cfg, stack="decoder")
        self.unembed = Unembed(cfg)
        self.init_weights()
        if move_to_device and cfg.device is not None:
            self.to(cfg.device)
        self.setup()

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
        if self.unembed.lm_head is not None:
            normal(self.unembed.lm_head, 1.0)
        inner = cfg.n_heads * cfg.d_head
        for attn in self.attention_layers():
            normal(attn.q_proj, (cfg.d_model * cfg.d_head) ** -0.5)
            normal(attn.k_proj, cfg.d_model**-0.5)
            normal(attn.v_proj, cfg.d_model**-0.5)
            normal(attn.o_proj, inner**-0.5)
            if attn.rel_bias_table is not None:
                normal(attn.rel_bias_table, cfg.d_model**-0.5)
        for block in [*self.encoder, *self.decoder]:
            if block.mlp.gate_proj is not None:
                normal(block.mlp.gate_proj, cfg.d_model**-0.5)
            normal(block.mlp.in_proj, cfg.d_model**-0.5)
            normal(block.mlp.out_proj, cfg.d_mlp**-0.5)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.w.fill_(f)

    def attention_layers(self) -> list[Attention]:
        return [b.attn for b in self.encoder] + [m for b in self.decoder for m in (b.attn, b.cross_attn)]

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Toggle `hook_result` (per-head attention outputs `[B,pos,H,d_model]`, memory hungry)."""
        self.cfg.use_attn_result = use_attn_result
        self._toggle_hooks(self.attention_layers(), ["hook_result"], use_attn_result)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Toggle `{s}.{l}.hook_mlp_in`: the pre-norm residual as only the MLP reads it (on by default here)."""
        self.cfg.use_hook_mlp_in = use_hook_mlp_in
        self._toggle_hooks([*self.encoder, *self.decoder], ["hook_mlp_in"], use_hook_mlp_in)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Toggle `{s}.{l}.hook_attn_in` and `decoder.{l}.hook_cross_attn_in`: the attention inputs as one copy
        per head `[B,pos,H,d_model]` (before the norm), so a hook can patch one head's input."""
        self.cfg.use_attn_in = use_attn_in
        self._toggle_hooks([*self.encoder, *self.decoder], ["hook_attn_in"], use_attn_in)
        self._toggle_hooks(list(self.decoder), ["hook_cross_attn_in"], use_attn_in)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Toggle `attn.hook_q_input / hook_k_input / hook_v_input` (self- and cross-attention): separate per-head
        copies of the query, key and value inputs `[B,pos,H,d_model]` (cross-attention's keys and values read the
        encoder output), for path patching into one head's queries, keys or values."""
        self.cfg.use_split_qkv_input = use_split_qkv_input
        self._toggle_hooks(
            self.attention_layers(), ["hook_q_input", "hook_k_input", "hook_v_input"], use_split_qkv_input
        )

    def _toggle_hooks(self, modules: list[nn.Module], names: list[str], on: bool) -> None:
        """Add (with the axes their constructor declares) or remove optional hook points, then re-index."""
        for module in modules:
            for name in names:
                if on and not hasattr(module, name):
                    setattr(module, name, optional_hook(module, name))
                elif not on and hasattr(module, name):
                    delattr(module, name)
        self.setup()

    def fold_ln(self) -> HookedEncoderDecoder:
        """Fold every RMSNorm weight into the weights that read it (norms become pure normalisation; unties a
        tied unembedding). Logits and residual streams are unchanged; `hook_encoder_out` and
        `unembed.hook_in` lose the norm weight. See fold.py. Returns self."""
        from .analysis.fold import fold_layer_norms

        return fold_layer_norms(self)

    @classmethod
    def reference_layout(cls) -> HookLayout:
        """The hook layout with every optional point on (gated MLP, `use_attn_result`), from a tiny model."""
        return _reference_layout()

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

    def decode(
        self,
        decoder_tokens: Tensor,  # [B,D] (only the new positions when `cache` holds earlier ones)
        encoder_out: Tensor | None,  # [B,E,d_model]; None when `cache` already holds the cross-attention K/V
        attention_mask: Tensor | None = None,  # [B,E] encoder padding
        decoder_attention_mask: Tensor | None = None,  # [B, cached + D] decoder padding
        io: HookIO | None = None,
        cache: DecoderCache | None = None,
    ) -> Tensor:  # logits [B,D,d_vocab]
        """Decoder stack and unembedding. With a `DecoderCache`, K/V of earlier steps are reused."""
        B, D = decoder_tokens.shape
        if encoder_out is not None:
            E = encoder_out.shape[1]
        elif cache is not None and cache.cross_attn[0].k is not None:
            E = cache.cross_attn[0].k.shape[2]
        else:
            raise ValueError("decode() needs encoder_out, or a DecoderCache that already holds the cross-attention K/V")
        past = 0 if cache is None else cache.length
        enc_mask = None if attention_mask is None else attention_mask.bool()
        dec_mask = None if decoder_attention_mask is None else decoder_attention_mask.bool()
        resid = self.hook_decoder_embed(self.embed(decoder_tokens), io)
        self_attns = [block.attn for block in self.decoder]
        cross_attns = [block.cross_attn for block in self.decoder]
        self_ctx = attention_context(self_attns[0], self_attns, D, past + D, dec_mask, io, resid.device, q_offset=past)
        cross_ctx = attention_context(cross_attns[0], cross_attns, D, E, enc_mask, io, resid.device)
        for layer, block in enumerate(self.decoder):
            resid = block(
                resid,
                encoder_out,
                self_ctx,
                cross_ctx,
                io,
                self_cache=None if cache is None else cache.self_attn[layer],
                cross_cache=None if cache is None else cache.cross_attn[layer],
            )
        resid = self.decoder_final_ln(resid, io)
        return self.unembed(resid, self.embed.W_E, io)

    def forward(
        self,
        input: TextOrTokens,
        decoder_input: TextOrTokens | None = None,
        return_type: Literal["logits", "loss", "both"] | None = "logits",
        one_zero_attention_mask: Tensor | None = None,
        *,
        decoder_attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        loss_per_token: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor] | None:
        """Run encoder and decoder (the reference's positional order: input, decoder_input, return_type, mask).

        `input`: tokens `[B,E]`, a string or a list of strings (needs a tokenizer). `decoder_input`:
        tokens `[B,D]` or text (the start token is prepended, no EOS appended: `logits[:, -1]` predicts the
        next token); defaults to `labels` shifted right behind the start token, else to one start token per
        row. `one_zero_attention_mask`: `[B,E]`, 1 = attend (derived from padding for strings; inferred from
        pad tokens, with a warning, for token batches). `decoder_attention_mask`: `[B,D]`. `return_type`:
        "logits" `[B,D,d_vocab]`, "loss" (mean cross-entropy against `labels`, -100 ignored; `[B,D]` with
        `loss_per_token`), "both" -> (logits, loss), or None.
        """
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type={return_type!r}; valid: 'logits', 'loss', 'both', None")
        tokens, mask, dec_tokens, dec_mask, labels = self.prepare_inputs(
            input, decoder_input, one_zero_attention_mask, decoder_attention_mask, labels
        )
        if return_type in ("loss", "both") and labels is None:
            raise ValueError(f"return_type={return_type!r} needs labels= (decoder target tokens, -100 = ignore)")
        logits = self.decode(dec_tokens, self.encode(tokens, mask), mask, dec_mask)
        if return_type is None:
            return None
        if return_type == "logits":
            return logits
        loss = lm_loss(logits, labels, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def loss_fn(self, logits: Tensor, tokens: Tensor, per_token: bool = False) -> Tensor:
        """Cross-entropy of `logits` `[B,D,d_vocab]` against target `tokens` `[B,D]` (the labels: position i
        predicts token i, as the decoder input is the labels shifted right; -100 ignored). TransformerLens's
        decoder-only `loss_fn` shifts by one instead; here the shift lives in the decoder input."""
        return lm_loss(logits, torch.as_tensor(tokens, device=logits.device).long(), per_token=per_token)

    # ---- input handling ----------------------------------------------------------------
    def prepare_inputs(
        self,
        input: TextOrTokens,
        decoder_input: TextOrTokens | None = None,
        attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None]:
        """Tokenize strings, default the decoder input, and validate everything (clear errors, nothing mutated).

        Returns (tokens, attention_mask, decoder_tokens, decoder_attention_mask, labels) on the model's device.
        Token batches given without a mask get one inferred from `pad_token_id` (see `infer_padding_mask`).
        Token-range checks are skipped while compiling (they would need a data-dependent branch).
        """
        device = self.embed.W_E.device
        tokens, text_mask = self._tokens_and_mask(input, "input")
        if attention_mask is None:
            attention_mask = text_mask if text_mask is not None else self.infer_padding_mask(tokens)
        B = tokens.shape[0]
        if labels is not None:
            labels = self._as_token_tensor(labels, "labels", allow_ignore=True).to(device)
            if labels.shape[0] != B:
                raise ValueError(f"labels batch {labels.shape[0]} != input batch {B}")
        if decoder_input is None:
            if labels is not None:  # padding (-100) only after the targets: causal attention never reads it
                dec_tokens = self.shift_right(labels)
            else:
                dec_tokens = torch.full((B, 1), self.cfg.decoder_start_token_id, dtype=torch.long, device=device)
        else:
            dec_tokens, dec_text_mask = self._tokens_and_mask(decoder_input, "decoder_input", prepend_start=True)
            if decoder_attention_mask is None:
                decoder_attention_mask = (
                    dec_text_mask if dec_text_mask is not None else self.infer_padding_mask(dec_tokens, decoder=True)
                )
        if dec_tokens.shape[0] == 1 and B > 1:  # one decoder prompt for the whole batch
            dec_tokens = dec_tokens.expand(B, -1)
            if decoder_attention_mask is not None and decoder_attention_mask.shape[0] == 1:
                decoder_attention_mask = decoder_attention_mask.expand(B, -1)
        if dec_tokens.shape[0] != B:
            raise ValueError(f"decoder_input batch {dec_tokens.shape[0]} != input batch {B}")
        if labels is not None and labels.shape != dec_tokens.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != decoder_input shape {tuple(dec_tokens.shape)}")
        attention_mask = self._check_mask(attention_mask, tokens, "one_zero_attention_mask")
        decoder_attention_mask = self._check_mask(decoder_attention_mask, dec_tokens, "decoder_attention_mask")
        return tokens.to(device), attention_mask, dec_tokens.to(device), decoder_attention_mask, labels

    def infer_padding_mask(self, tokens: Tensor, decoder: bool = False) -> Tensor | None:
        """The mask of a token batch given without one: 1 where the token is not `pad_token_id` (T5 never uses
        the pad token inside a sequence). In the decoder, the leading start token is not padding even when it
        is the pad id. None when there is no pad token (eagerly; the first time a mask is inferred, a warning
        says so). While compiling or exporting the mask is always built (no data-dependent branch); it is all
        ones, so the same numbers, when nothing is padded."""
        mask = tokens != self.cfg.pad_token_id
        if decoder:
            mask[:, 0] = True
        if is_tracing():
            return mask.long()
        if bool(mask.all()):
            return None
        if not getattr(self, "_warned_inferred_padding", False):
            self._warned_inferred_padding = True
            warnings.warn(
                f"a token batch contains pad_token_id={self.cfg.pad_token_id} and no attention mask was given: "
                f"masking those positions as padding (pass one_zero_attention_mask= / decoder_attention_mask= "
                f"to silence this). This warning is shown once.",
                stacklevel=_caller_stacklevel(),
            )
        return mask.long()

    def _tokens_and_mask(
        self, value: TextOrTokens, what: str, prepend_start: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(value, str) or (isinstance(value, (list, tuple)) and value and isinstance(value[0], str)):
            if self.tokenizer is None:
                raise ValueError(
                    f"{what} is text but this model has no tokenizer; pass token ids, or load with "
                    f"tokenizer=... (any Hugging Face tokenizer)"
                )
            if prepend_start:
                tokens, mask = self._tokenize_decoder(value)
            else:
                tokens, mask = self._tokenize(value)
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

    def shift_right(self, labels: Tensor) -> Tensor:
        """Decoder input for teacher forcing: start token, then labels[:, :-1] (-100 -> pad)."""
        start = torch.full_like(labels[:, :1], self.cfg.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.cfg.pad_token_id)

    # ---- tokenizer ---------------------------------------------------------------------
    def _tokenize(self, text: str | Sequence[str], add_special_tokens: bool = True) -> tuple[Tensor, Tensor]:
        batch = [text] if isinstance(text, str) else list(text)
        out = self.tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        return out["input_ids"].long(), out["attention_mask"].long()

    def _tokenize_decoder(self, text: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Decoder text -> (start token + text tokens, mask): no EOS, so the model continues the text."""
        tokens, mask = self._tokenize(text, add_special_tokens=False)
        start = torch.full((tokens.shape[0], 1), self.cfg.decoder_start_token_id, dtype=tokens.dtype)
        return torch.cat([start, tokens], dim=1), torch.cat([torch.ones_like(start), mask], dim=1)

    def to_tokens(self, input: str | Sequence[str], move_to_device: bool = True) -> Tensor:
        """Text -> token ids `[batch, pos]` (padded with the pad token; the tokenizer adds EOS as T5 expects)."""
        if self.tokenizer is None:
            raise ValueError("to_tokens needs a tokenizer: load the model with tokenizer=...")
        tokens, _ = self._tokenize(input)
        return tokens.to(self.embed.W_E.device) if move_to_device else tokens

    def to_decoder_tokens(self, input: str | Sequence[str], move_to_device: bool = True) -> Tensor:
        """Decoder text -> ids `[batch, 1 + pos]`: the start token, then the text without EOS (what text passed
        as `decoder_input` becomes; rows of a batch are right-padded with the pad token)."""
        if self.tokenizer is None:
            raise ValueError("to_decoder_tokens needs a tokenizer: load the model with tokenizer=...")
        tokens, _ = self._tokenize_decoder(input)
        return tokens.to(self.embed.W_E.device) if move_to_device else tokens

    def to_string(self, tokens: Tensor | Sequence[int]) -> str | list[str]:
        """Token ids -> text (a list of strings for a batch)."""
        if self.tokenizer is None:
            raise ValueError("to_string needs a tokenizer: load the model with tokenizer=...")
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return [self.tokenizer.decode(row.tolist()) for row in tokens]
        return self.tokenizer.decode(tokens.tolist())

    def to_str_tokens(self, input: str | Tensor | Sequence[Any]) -> list[str] | list[list[str]]:
        """One string per token, for labelling plots. A string or one sequence of ids gives a list; a list of
        strings or a `[batch, pos]` tensor (batch > 1) gives one list per row, as TransformerLens."""
        if self.tokenizer is None:
            raise ValueError("to_str_tokens needs a tokenizer: load the model with tokenizer=...")
        if isinstance(input, (list, tuple)) and input and isinstance(input[0], str):
            return [self.to_str_tokens(text) for text in input]
        if isinstance(input, str):
            tokens = self.to_tokens(input, move_to_device=False)[0]
        else:
            tokens = torch.as_tensor(input)
            if tokens.ndim == 2:
                if tokens.shape[0] != 1:
                    return [self.to_str_tokens(row) for row in tokens]
                tokens = tokens[0]
        label = getattr(self.tokenizer, "str_tokens", None)  # a tokenizer that labels its own tokens
        if callable(label):
            return label(tokens.tolist())
        return [self.tokenizer.decode([t]) for t in tokens.tolist()]

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (without special tokens); an error otherwise."""
        if self.tokenizer is None:
            raise ValueError("to_single_token needs a tokenizer: load the model with tokenizer=...")
        ids = self.tokenizer(string, add_special_tokens=False)["input_ids"]
        ids = ids[0] if ids and isinstance(ids[0], list) else ids
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens {list(ids)}, not one")
        return int(ids[0])

    def to_single_str_token(self, int_token: int) -> str:
        """The string of one token id."""
        if isinstance(int_token, Tensor):
            int_token = int(int_token.item())
        return self.to_str_tokens([int(int_token)])[0]

    def get_token_position(
        self,
        single_token: str | int,
        input: str | Tensor,
        mode: Literal["first", "last"] = "first",
    ) -> int:
        """Position of `single_token` (a one-token string or an id) in `input` (text, tokenized as `to_tokens`
        does, or one row of ids), its first or last occurrence; an error when absent."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode={mode!r}; valid: 'first', 'last'")
        tokens = self.to_tokens(input, move_to_device=False)[0] if isinstance(input, str) else torch.as_tensor(input)
        if tokens.ndim == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"get_token_position takes one sequence, got a batch of {tokens.shape[0]}")
            tokens = tokens[0]
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        positions = (tokens == token).nonzero()[:, 0]
        if positions.numel() == 0:
            raise ValueError(f"token {token} ({single_token!r}) does not occur in the input")
        return int(positions[0] if mode == "first" else positions[-1])

    def tokens_to_residual_directions(self, tokens: str | int | Tensor) -> Tensor:  # [*tokens_shape, d_model]
        """The unembedding columns of `tokens` (a one-token string, an id, or an id tensor): the residual
        directions, read after the decoder's final norm and T5's logit scaling, whose dot product is the logit."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        tokens = torch.as_tensor(tokens, device=self.W_U.device)
        if tokens.is_floating_point():
            raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        return self.W_U.T[tokens.long()]

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True, *, stack: str = "decoder"
    ) -> Tensor:  # [d_model]
        """The sum of the biases written into the residual stream before `layer`: zeros, as T5 has no biases."""
        n = self.cfg.n_layers if stack == "encoder" else self.cfg.n_decoder_layers
        if stack not in ("encoder", "decoder") or not 0 <= layer <= n:
            raise ValueError(f"layer={layer} of stack={stack!r}: valid stacks 'encoder'/'decoder', layers 0..{n}")
        return torch.zeros(self.cfg.d_model, dtype=self.W_E.dtype, device=self.W_E.device)

    def all_composition_scores(
        self, mode: Literal["Q", "K", "V"], attn: Literal["self", "cross"] = "self"
    ) -> Tensor:  # [L, H, L', H]
        """TransformerLens's composition scores `|W_A W_B|_F / (|W_A|_F |W_B|_F)` of every earlier head's OV
        circuit (left) with every later head's Q, K or V side (right).

        `attn="self"`: self-attention heads in the stacked order (encoder layers, then decoder layers)
        `[L, H, L, H]`; a pair scores 0 unless the left head's layer comes before the right one's in the same
        stack. `attn="cross"`: the cross-attention heads on the right, `[L_enc, H, L_dec, H]` for "K" / "V"
        (every encoder head writes into the encoder output they read) and `[L_dec, H, L_dec, H]` for "Q"
        (decoder self-attention heads of the same or earlier layers). Norm weights are not folded in: call
        `fold_ln()` first for scores of the circuits as they act.
        """
        if mode not in ("Q", "K", "V"):
            raise ValueError(f"mode={mode!r}; valid: 'Q', 'K', 'V'")
        if attn not in ("self", "cross"):
            raise ValueError(f"attn={attn!r}; valid: 'self', 'cross'")
        L_enc, L_dec = self.cfg.n_layers, self.cfg.n_decoder_layers
        if attn == "self":
            left = self.OV
            right = {"Q": self.QK, "K": self.QK.T, "V": self.OV}[mode]
            stack_of = torch.tensor([0] * L_enc + [1] * L_dec)
            layer_of = torch.cat([torch.arange(L_enc), torch.arange(L_dec)])
            allowed = (stack_of[:, None] == stack_of[None, :]) & (layer_of[:, None] < layer_of[None, :])
        elif mode == "Q":
            left = self.OV[L_enc:]
            right = self.QK_cross
            allowed = torch.arange(L_dec)[:, None] <= torch.arange(L_dec)[None, :]
        else:
            left = self.OV[:L_enc]
            right = self.QK_cross.T if mode == "K" else self.OV_cross
            allowed = torch.ones(L_enc, L_dec, dtype=torch.bool)
        product = left[:, :, None, None] @ right[None, None]  # [L, H, L', H, d_model, d_model] factored
        scores = product.norm() / (left.norm()[:, :, None, None] * right.norm()[None, None])
        return torch.where(allowed[:, None, :, None].to(scores.device), scores, torch.zeros_like(scores))

    # ---- caching, capture --------------------------------------------------------------
    def run_with_cache(
        self,
        *model_args: Any,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        pos_slice: Any = None,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache | dict[str, Tensor]]:
        """Run and cache activations (`names_filter`: names, globs or predicate; `device`; `remove_batch_dim`).

        `pos_slice` (TransformerLens's) keeps only those positions of every activation: the position axis of
        `[batch, pos, ...]` activations, and the query axis of attention scores, patterns and position bias
        (an int keeps a position axis of size 1, so the cache's helpers still find one)."""
        out, cache = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        if pos_slice is not None:
            from .analysis.cache import apply_slice

            if isinstance(pos_slice, int) and not isinstance(pos_slice, bool):
                pos_slice = [pos_slice]
            attention_maps = ("hook_pattern", "hook_attn_scores", "rel_pos_hook")  # [B, H, Q, K]: the query axis
            cache = {
                name: apply_slice(t, pos_slice, dim=(2 if name.endswith(attention_maps) else 1) - remove_batch_dim)
                for name, t in cache.items()
            }
        if return_cache_object:
            return out, ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache

    def capture(
        self,
        names: NameFilter,
        patch: NameFilter = (),
        patch_mode: str | dict[str, str] = "replace",
        intervene: dict[str, nn.Module] | None = None,
    ):
        """A module sharing these weights that returns `{"logits", *names}` as explicit outputs (see capture.py);
        `intervene={hook name: module}` splices modules in, their side outputs named `"<hook name>.<output>"`."""
        from .capture import CaptureModule

        return CaptureModule(self, names, patch=patch, patch_mode=patch_mode, intervene=intervene)

    def generate(self, input: TextOrTokens, max_new_tokens: int = 20, **kwargs: Any) -> Any:
        """Autoregressive decoding with a KV cache; hooks fire at every step. See `t5hooks.generation.generate`
        (greedy by default; `do_sample`, `temperature`, `top_k`, `top_p`, `num_beams`, `return_cache`, ...)."""
        from .generation import generate

        return generate(self, input, max_new_tokens, **kwargs)

    # ---- loading -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        checkpoint_index: int | None = None,
        checkpoint_value: int | None = None,
        hf_model: Any = None,
        device: str | torch.device | None = None,
        tokenizer: Any = None,
        move_to_device: bool = True,
        dtype: torch.dtype | str | None = torch.float32,
        **from_pretrained_kwargs: Any,
    ) -> HookedEncoderDecoder:
        """Load a T5-family model: a Hugging Face hub name, a local `save_pretrained` directory, an embedded model
        (`t5hooks-tiny`), or a live HF model (`hf_model=`). The reference's signature and positional order.

        `dtype` (alias `torch_dtype`; None = float32). `tokenizer` overrides the checkpoint's (a directory
        without tokenizer files gives `model.tokenizer = None`). `move_to_device=False` leaves the weights on
        the CPU. TransformerLens's processing switches: `fold_ln` (default False, as the reference; see
        `fold_ln`), `refactor_factored_attn_matrices`; `center_writing_weights`, `center_unembed` and
        `fold_value_biases` are accepted and do nothing (T5 has RMSNorm and no biases, so they are identities).
        Other keywords: hub options (`cache_dir`, `revision`, ...) or `HookedT5Config` fields (`attn_impl`).
        """
        from .loading import load_pretrained
        from .pretrained import is_builtin, load_builtin

        kwargs = dict(from_pretrained_kwargs)
        if checkpoint_index is not None or checkpoint_value is not None:
            raise ValueError(
                "checkpoint_index / checkpoint_value select intermediate training checkpoints, which T5-family "
                "models do not publish; load the checkpoint directory or hub revision (revision=...) directly"
            )
        n_devices = kwargs.pop("n_devices", 1)
        if n_devices != 1:
            raise ValueError(
                f"n_devices={n_devices}: t5hooks does not split layers across devices; load on one device "
                f"(device='cuda:0'), or for data parallelism wrap model.capture(...) in DistributedDataParallel "
                f"(examples/train_ddp.py)"
            )
        if "torch_dtype" in kwargs:
            alias = kwargs.pop("torch_dtype")
            if dtype not in (None, torch.float32) and alias is not None and alias != dtype:
                raise ValueError(f"dtype={dtype} and torch_dtype={alias} disagree; pass one of them")
            dtype = alias if alias is not None else dtype
        dtype = _as_dtype(dtype)
        fold_ln = kwargs.pop("fold_ln", False)
        refactor = kwargs.pop("refactor_factored_attn_matrices", False)
        identities = [
            k for k in ("center_writing_weights", "center_unembed", "fold_value_biases") if kwargs.pop(k, False)
        ]
        if identities:
            logging.getLogger(__name__).info(
                "%s: no-op for T5 (RMSNorm has no mean subtraction and T5 has no biases)", ", ".join(identities)
            )
        if not move_to_device:
            device = None
        if hf_model is None and is_builtin(model_name):
            model = load_builtin(cls, model_name, device=device, dtype=dtype, tokenizer=tokenizer, **kwargs)
        else:
            model = load_pretrained(
                cls, model_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype, **kwargs
            )
        if fold_ln:
            model.fold_ln()
        if refactor:
            model.refactor_factored_attn_matrices()
        return model

    def refactor_factored_attn_matrices(self) -> HookedEncoderDecoder:
        """TransformerLens's refactoring: per head, replace W_Q, W_K by `U sqrt(S)`, `V sqrt(S)` of the SVD of
        `W_Q W_K^T`, and W_V, W_O by `U sqrt(S)`, `sqrt(S) V^T` of `W_V W_O` (self- and cross-attention). The
        circuits QK and OV, hence every output, are unchanged (T5 has no biases to move); q, k, v and z change.
        Returns self."""
        for attn in self.attention_layers():
            _refactor_attention(attn)
        return self

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use `tokenizer` (any Hugging Face tokenizer) for text inputs."""
        self.tokenizer = tokenizer

    def to(self, *args: Any, print_details: bool = True, **kwargs: Any) -> HookedEncoderDecoder:
        """nn.Module.to; also the reference's `to(device_or_dtype, print_details)` (details are logged at info)."""
        if len(args) == 2 and isinstance(args[1], bool):
            args, print_details = args[:1], args[1]
        result = super().to(*args, **kwargs)
        if print_details:
            logging.getLogger(__name__).info("moved model to %s, %s", self.cfg.device, self.cfg.dtype)
        return result

    def _apply(self, fn: Any, recurse: bool = True) -> HookedEncoderDecoder:
        """Every move or conversion (`to`, `half`, `bfloat16`, `float`, `cuda`, ...) keeps the run options
        `cfg.device` / `cfg.dtype` in step with the weights (`cfg` is the model's own copy)."""
        result = super()._apply(fn, recurse)
        self.cfg.device = str(self.embed.W_E.device)
        self.cfg.dtype = self.embed.W_E.dtype
        return result

    def cpu(self) -> HookedEncoderDecoder:
        return self.to("cpu")

    def cuda(self, device: int | str | torch.device | None = None) -> HookedEncoderDecoder:
        return self.to(
            torch.device("cuda")
            if device is None
            else torch.device("cuda", device)
            if isinstance(device, int)
            else device
        )

    def mps(self) -> HookedEncoderDecoder:
        return self.to("mps")

    # ---- weights, TransformerLens names --------------------------------------------------
    @property
    def W_E(self) -> Tensor:  # [d_vocab, d_model]
        return self.embed.W_E

    @property
    def W_U(self) -> Tensor:  # [d_model, d_vocab]
        return (self.embed.W_E if self.unembed.lm_head is None else self.unembed.lm_head).T

    @property
    def b_U(self) -> Tensor:  # [d_vocab]; T5 has no unembedding bias
        return torch.zeros(self.cfg.d_vocab, dtype=self.W_E.dtype, device=self.W_E.device)

    @property
    def W_pos(self) -> None:
        """None: T5 has no absolute positional embedding. Its relative position bias tables are
        `encoder[0].attn.rel_bias_table` and `decoder[0].attn.rel_bias_table` (`[num_buckets, n_heads]`)."""
        return None

    def _self_attns(self) -> list[Attention]:
        return [b.attn for b in self.encoder] + [b.attn for b in self.decoder]

    def _cross_attns(self) -> list[Attention]:
        return [b.cross_attn for b in self.decoder]

    def _mlps(self) -> list[nn.Module]:
        return [b.mlp for b in self.encoder] + [b.mlp for b in self.decoder]

    # Self-attention weights stack the encoder layers, then the decoder layers (as TransformerLens).
    W_Q = property(lambda self: torch.stack([a.W_Q for a in self._self_attns()]))  # [L,H,d_model,d_head]
    W_K = property(lambda self: torch.stack([a.W_K for a in self._self_attns()]))  # [L,H,d_model,d_head]
    W_V = property(lambda self: torch.stack([a.W_V for a in self._self_attns()]))  # [L,H,d_model,d_head]
    W_O = property(lambda self: torch.stack([a.W_O for a in self._self_attns()]))  # [L,H,d_head,d_model]
    b_Q = property(lambda self: torch.stack([a.b_Q for a in self._self_attns()]))  # [L,H,d_head]
    b_K = property(lambda self: torch.stack([a.b_K for a in self._self_attns()]))
    b_V = property(lambda self: torch.stack([a.b_V for a in self._self_attns()]))
    b_O = property(lambda self: torch.stack([a.b_O for a in self._self_attns()]))  # [L,d_model]
    # Cross-attention weights, decoder layers only.
    W_Q_cross = property(lambda self: torch.stack([a.W_Q for a in self._cross_attns()]))  # [L_dec,H,d_model,d_head]
    W_K_cross = property(lambda self: torch.stack([a.W_K for a in self._cross_attns()]))
    W_V_cross = property(lambda self: torch.stack([a.W_V for a in self._cross_attns()]))
    W_O_cross = property(lambda self: torch.stack([a.W_O for a in self._cross_attns()]))  # [L_dec,H,d_head,d_model]
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

    @property
    def QK_cross(self) -> FactoredMatrix:  # [L_dec,H,d_model,d_model] (decoder query x encoder key)
        return FactoredMatrix(self.W_Q_cross, self.W_K_cross.transpose(-2, -1))

    @property
    def OV_cross(self) -> FactoredMatrix:  # [L_dec,H,d_model,d_model]
        return FactoredMatrix(self.W_V_cross, self.W_O_cross)

    def all_head_labels(self, stack: Literal["encoder", "decoder", "cross"] | None = None) -> list[str]:
        """ "L{l}H{h}" per head. Without `stack`, in the order of the stacked weights (encoder layers,
        then decoder layers); with it, layer indices within that stack."""
        layers = {
            None: self.cfg.n_layers + self.cfg.n_decoder_layers,
            "encoder": self.cfg.n_layers,
            "decoder": self.cfg.n_decoder_layers,
            "cross": self.cfg.n_decoder_layers,
        }
        if stack not in layers:
            raise ValueError(f"stack={stack!r}; valid: None, 'encoder', 'decoder', 'cross'")
        return [f"L{layer}H{head}" for layer in range(layers[stack]) for head in range(self.cfg.n_heads)]


@torch.no_grad()
def _refactor_attention(attn: nn.Module) -> None:
    """TransformerLens's `refactor_factored_attn_matrices` for one T5 attention layer (no biases to move).

    Per head, `W_Q W_K^T = U S V^T` becomes `W_Q = U sqrt(S)`, `W_K = V sqrt(S)`, and `W_V W_O = U S V^T`
    becomes `W_V = U sqrt(S)`, `W_O = sqrt(S) V^T`: the products, so every score and output, are unchanged.
    """
    H, d = attn.cfg.n_heads, attn.cfg.d_head

    def to_proj(W: Tensor) -> Tensor:  # [H, d_model, d_head] -> nn.Linear layout [H*d_head, d_model]
        return W.transpose(1, 2).reshape(H * d, -1)

    U, S, V = FactoredMatrix(attn.W_Q.float(), attn.W_K.float().transpose(1, 2)).svd()  # [H,m,d] [H,d] [H,m,d]
    root = S.sqrt()[:, None, :]
    new_q, new_k = to_proj(U * root), to_proj(V * root)
    U, S, V = FactoredMatrix(attn.W_V.float(), attn.W_O.float()).svd()
    root = S.sqrt()[:, None, :]
    new_v = to_proj(U * root)
    new_o = (V * root).transpose(1, 2).reshape(H * d, -1).T  # W_O = sqrt(S) V^T [H,d,m] -> [m, H*d]
    for name, value in (("q_proj", new_q), ("k_proj", new_k), ("v_proj", new_v), ("o_proj", new_o)):
        old = getattr(attn, name)
        setattr(attn, name, nn.Parameter(value.to(old.dtype).contiguous(), requires_grad=old.requires_grad))


@functools.cache
def _reference_layout() -> HookLayout:
    cfg = HookedT5Config(
        d_model=8,
        d_head=4,
        n_heads=2,
        d_mlp=8,
        n_layers=2,
        d_vocab=8,
        gated_mlp=True,
        use_attn_result=True,
        use_attn_in=True,
        use_split_qkv_input=True,
    )
    return HookedEncoderDecoder(cfg).layout


set_default_layout(_reference_layout)
