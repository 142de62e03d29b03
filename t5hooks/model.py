"""HookedEncoderDecoder: a T5 encoder-decoder with a hook point on every interesting activation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .analysis.cache import ActivationCache
from .analysis.factored_matrix import FactoredMatrix
from .components import Attention, DecoderBlock, EncoderBlock, RMSNorm, attention_context, lm_loss
from .config import HookedT5Config
from .hook_points import HookedRootModule, HookIO, HookPoint, NameFilter, is_tracing
from .kv_cache import DecoderCache

TextOrTokens = Union[Tensor, str, Sequence[str]]
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
        self.hook_in = HookPoint()  # [B,D,d_model] after the scaling

    def forward(self, resid: Tensor, tied_weight: Tensor, io: HookIO | None = None) -> Tensor:
        if self.scale is not None:
            resid = resid * self.scale
        resid = self.hook_in(resid, io)
        return F.linear(resid, tied_weight if self.lm_head is None else self.lm_head)  # [B,D,d_vocab]


class HookedEncoderDecoder(HookedRootModule):
    """T5-family encoder-decoder with TransformerLens-style hooks and explicit-output capture.

    Build with random weights from a config (`HookedEncoderDecoder(cfg)`), or load with
    `HookedEncoderDecoder.from_pretrained(name_or_path)`. Hook names are in `model.hook_dict`.
    """

    def __init__(self, cfg: HookedT5Config, tokenizer: Any = None, move_to_device: bool = True) -> None:
        super().__init__()
        if isinstance(cfg, dict):
            cfg = HookedT5Config.from_dict(cfg)
        if not isinstance(cfg, HookedT5Config):
            raise TypeError(f"cfg must be a HookedT5Config or dict, got {type(cfg).__name__}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        # Modules are defined in forward order, so hook_dict (and capture outputs) follow the computation.
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()  # [B,E,d_model]
        self.encoder = nn.ModuleList(EncoderBlock(cfg, layer) for layer in range(cfg.n_layers))
        self.encoder_final_ln = RMSNorm(cfg)
        self.hook_encoder_out = HookPoint()  # [B,E,d_model] what cross-attention reads
        self.hook_decoder_embed = HookPoint()  # [B,D,d_model]
        self.decoder = nn.ModuleList(DecoderBlock(cfg, layer) for layer in range(cfg.n_decoder_layers))
        self.decoder_final_ln = RMSNorm(cfg)
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
        for attn in self.attention_layers():
            if use_attn_result and not hasattr(attn, "hook_result"):
                attn.hook_result = HookPoint()
            elif not use_attn_result and hasattr(attn, "hook_result"):
                del attn.hook_result
        self.setup()

    def fold_ln(self) -> HookedEncoderDecoder:
        """Fold every RMSNorm weight into the weights that read it (norms become pure normalisation; unties a
        tied unembedding). Logits and residual streams are unchanged; `hook_encoder_out`, `hook_mlp_in` and
        `unembed.hook_in` lose the norm weight. See fold.py. Returns self."""
        from .analysis.fold import fold_layer_norms

        return fold_layer_norms(self)

    def _name_hint(self, name: str) -> str:
        if name.endswith("hook_result") and not self.cfg.use_attn_result:
            return "(hook_result exists only with cfg.use_attn_result=True; call model.set_use_attn_result(True))"
        if name.endswith("hook_pre_linear") and not self.cfg.gated_mlp:
            return "(hook_pre_linear exists only in gated MLPs: T5 v1.1, mT5, ByT5)"
        if "rel_pos_hook" in name and not self.cfg.per_layer_position_bias:
            return "(the position bias hook lives on layer 0 only: encoder.0.attn.rel_pos_hook, decoder.0.attn.rel_pos_hook)"
        return ""

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
        one_zero_attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        return_type: Literal["logits", "loss", "both"] | None = "logits",
        labels: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor] | None:
        """Run encoder and decoder.

        `input`: tokens `[B,E]`, a string or a list of strings (needs a tokenizer). `decoder_input`:
        tokens `[B,D]`; defaults to `labels` shifted right behind the start token, else to one start
        token per row. `one_zero_attention_mask`: `[B,E]`, 1 = attend (derived from padding for
        strings). `decoder_attention_mask`: `[B,D]`. `return_type`: "logits" `[B,D,d_vocab]`, "loss"
        (mean cross-entropy against `labels`, -100 ignored), "both" -> (logits, loss), or None.
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
        loss = lm_loss(logits, labels)
        return loss if return_type == "loss" else (logits, loss)

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
        Token-range checks are skipped while compiling (they would need a data-dependent branch).
        """
        device = self.embed.W_E.device
        tokens, text_mask = self._tokens_and_mask(input, "input")
        if attention_mask is None:
            attention_mask = text_mask
        B = tokens.shape[0]
        if labels is not None:
            labels = self._as_token_tensor(labels, "labels", allow_ignore=True).to(device)
            if labels.shape[0] != B:
                raise ValueError(f"labels batch {labels.shape[0]} != input batch {B}")
        if decoder_input is None:
            if labels is not None:
                dec_tokens = self.shift_right(labels)
            else:
                dec_tokens = torch.full((B, 1), self.cfg.decoder_start_token_id, dtype=torch.long, device=device)
        else:
            dec_tokens, dec_text_mask = self._tokens_and_mask(decoder_input, "decoder_input", prepend_start=True)
            if decoder_attention_mask is None:
                decoder_attention_mask = dec_text_mask
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

    def shift_right(self, labels: Tensor) -> Tensor:
        """Decoder input for teacher forcing: start token, then labels[:, :-1] (-100 -> pad)."""
        start = torch.full_like(labels[:, :1], self.cfg.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.cfg.pad_token_id)

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
        from .tokenizer import ByteTokenizer

        if isinstance(self.tokenizer, ByteTokenizer):  # one byte per token: name it, do not decode it alone
            return self.tokenizer.convert_ids_to_tokens(tokens.tolist())
        return [self.tokenizer.decode([t]) for t in tokens.tolist()]

    # ---- caching, capture --------------------------------------------------------------
    def run_with_cache(
        self, *model_args: Any, return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs: Any
    ) -> tuple[Any, ActivationCache | dict[str, Tensor]]:
        """Run and cache activations (`names_filter`: names, globs or predicate; `device`; `remove_batch_dim`)."""
        out, cache = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        if return_cache_object:
            return out, ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache

    def capture(self, names: NameFilter, patch: NameFilter = (), patch_mode: str | dict[str, str] = "replace"):
        """A module sharing these weights that returns `{"logits", *names}` as explicit outputs (see capture.py)."""
        from .capture import CaptureModule

        return CaptureModule(self, names, patch=patch, patch_mode=patch_mode)

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
        *,
        hf_model: Any = None,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> HookedEncoderDecoder:
        """Load a T5-family model: a Hugging Face hub name, a local `save_pretrained` directory, or a live HF
        model (`hf_model=`). Weights load through safetensors (or `torch.load(weights_only=True)`).
        `fold_ln=True` folds the RMSNorm weights into the following weights after loading (see `fold_ln`)."""
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

    def to(self, *args: Any, **kwargs: Any) -> HookedEncoderDecoder:
        """nn.Module.to, keeping `cfg.device` / `cfg.dtype` in step (`print_details` is accepted, as TL)."""
        kwargs.pop("print_details", None)
        result = super().to(*args, **kwargs)
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
