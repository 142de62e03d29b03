"""HookedEncoderDecoder: a T5 encoder-decoder with a hook point on every interesting activation."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .analysis.factored_matrix import FactoredMatrix
from .base import HookedT5Base, TextOrTokens, as_config
from .components import RESID, Attention, DecoderBlock, Embed, RMSNorm, attention_context, lm_loss
from .config import HookedT5Config
from .hook_io import HookIO, NameFilter
from .hook_points import HookPoint
from .hook_registry import HookLayout, set_default_layout
from .kernels import cpu_gemm
from .kv_cache import DecoderCache
from .regions import run_decoder_block

__all__ = ["Embed", "HookedEncoderDecoder", "TextOrTokens", "Unembed"]

RETURN_TYPES = ("logits", "loss", "both", None)


class Unembed(nn.Module):
    """Logits from the final decoder residual: optional `d_model**-0.5` scaling, then `W_U`.

    With tied embeddings there is no weight here: the model passes `W_E` in.
    """

    def __init__(self, cfg: HookedT5Config) -> None:
        super().__init__()
        self.cfg = cfg
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
        weight = tied_weight if self.lm_head is None else self.lm_head
        return self.hook_out(cpu_gemm.linear(resid, weight, self.cfg.cpu_gemm), io)


class HookedEncoderDecoder(HookedT5Base):
    """T5-family encoder-decoder with TransformerLens-style hooks and explicit-output capture.

    Build with random weights from a config (`HookedEncoderDecoder(cfg)`), or load with
    `HookedEncoderDecoder.from_pretrained(name_or_path)`. Hook names are in `model.hook_dict`.
    """

    def __init__(self, cfg: HookedT5Config, tokenizer: Any = None, move_to_device: bool = True, **kwargs: Any) -> None:
        """`kwargs` override fields of `cfg` (e.g. `use_attn_result=True`), as the reference's `**kwargs`."""
        super().__init__()
        cfg = as_config(cfg, **kwargs)
        # Modules are defined in forward order, so hook_dict (and capture outputs) follow the computation.
        self.build_encoder(cfg, tokenizer)
        self.hook_decoder_embed = HookPoint(RESID, stack="decoder", alias="embed")
        self.decoder = nn.ModuleList(DecoderBlock(cfg, layer) for layer in range(cfg.n_decoder_layers))
        self.decoder_final_ln = RMSNorm(cfg, stack="decoder")
        self.unembed = Unembed(cfg)
        self.finish_init(move_to_device)

    # ---- construction ------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        return [*self.encoder, *self.decoder]

    def attention_layers(self) -> list[Attention]:
        return [b.attn for b in self.encoder] + [m for b in self.decoder for m in (b.attn, b.cross_attn)]

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
            resid = run_decoder_block(
                block,
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

        `input`: tokens `[B,E]`, a string or a list of strings (needs a tokenizer), or the `(tokens, mask)` pair
        `to_tokens` returns. `decoder_input`:
        tokens `[B,D]` or text (the start token is prepended, no EOS appended: `logits[:, -1]` predicts the
        next token); defaults to `labels` shifted right behind the start token, else to one start token per
        row. `one_zero_attention_mask`: `[B,E]`, 1 = attend (from the tokenizer for strings; without one every
        token is attended, and a right-padded-looking token batch warns). `decoder_attention_mask`: `[B,D]`
        (none: every decoder token attended). `return_type`:
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
        warn_padding: bool = True,
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None]:
        """Tokenize strings, default the decoder input, and validate everything (clear errors, nothing mutated).

        Returns (tokens, attention_mask, decoder_tokens, decoder_attention_mask, labels) on the model's device.
        `input` / `decoder_input` may be the `(tokens, attention_mask)` pair `to_tokens` returns. A token batch
        without a mask is attended everywhere (see `prepare_encoder_inputs`); the decoder input never gets an
        inferred mask (the pad id is its start token, and a generated 0 inside it is a real token).
        Token-range checks are skipped while compiling (they would need a data-dependent branch).
        """
        device = self.embed.W_E.device
        tokens, attention_mask = self.prepare_encoder_inputs(input, attention_mask, warn_padding)
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
            decoder_input, decoder_attention_mask = self._split_pair(
                decoder_input, decoder_attention_mask, "decoder_input", "decoder_attention_mask"
            )
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
        decoder_attention_mask = self._check_mask(decoder_attention_mask, dec_tokens, "decoder_attention_mask")
        return tokens, attention_mask, dec_tokens.to(device), decoder_attention_mask, labels

    def shift_right(self, labels: Tensor) -> Tensor:
        """Decoder input for teacher forcing: start token, then labels[:, :-1] (-100 -> pad)."""
        start = torch.full_like(labels[:, :1], self.cfg.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.cfg.pad_token_id)

    def attention_view(
        self,
        input: TextOrTokens,
        decoder_input: TextOrTokens | None = None,
        *,
        one_zero_attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        batch_index: int = 0,
        kinds: Sequence[str] | None = None,
        layers: Sequence[int] | None = None,
    ) -> Any:
        """Run `input` (and `decoder_input`) and show example `batch_index`'s encoder self-, decoder self- and
        cross-attention patterns as an interactive page (`t5hooks.viz.AttentionView`: displays in a notebook,
        `.save("attn.html")`), padded positions hidden."""
        tokens, mask, dec, dec_mask, _ = self.prepare_inputs(
            input, decoder_input, one_zero_attention_mask, decoder_attention_mask
        )
        with torch.no_grad():
            _, cache = self.run_with_cache(
                tokens,
                dec,
                one_zero_attention_mask=mask,
                decoder_attention_mask=dec_mask,
                names_filter=lambda n: n.endswith("hook_pattern"),
            )
        ones = lambda t: torch.ones_like(t)
        return cache.attention_view(
            tokens,
            dec,
            batch_index=batch_index,
            attention_mask=ones(tokens) if mask is None else mask,
            decoder_attention_mask=ones(dec) if dec_mask is None else dec_mask,
            kinds=kinds,
            layers=layers,
            title=f"Attention · {self.cfg.model_name}",
        )

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

    # ---- capture, generation --------------------------------------------------------------
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

    def generate(self, input: TextOrTokens, max_new_tokens: int = 10, **kwargs: Any) -> Any:
        """Autoregressive decoding with a KV cache; hooks fire at every step. See `t5hooks.generation.generate`
        (greedy by default; `eos_token_id` an id or a list, `do_sample`, `temperature`, `top_k`, `top_p`,
        `num_beams`, `return_cache`, ...). `input` may be the `(tokens, mask)` pair `to_tokens` returns."""
        from .generation import generate

        return generate(self, input, max_new_tokens, **kwargs)

    def refactor_factored_attn_matrices(self) -> HookedEncoderDecoder:
        """TransformerLens's refactoring: per head, replace W_Q, W_K by `U sqrt(S)`, `V sqrt(S)` of the SVD of
        `W_Q W_K^T`, and W_V, W_O by `U sqrt(S)`, `sqrt(S) V^T` of `W_V W_O` (self- and cross-attention). The
        circuits QK and OV, hence every output, are unchanged (T5 has no biases to move); q, k, v and z change.
        Returns self."""
        for attn in self.attention_layers():
            _refactor_attention(attn)
        return self

    # ---- weights, TransformerLens names --------------------------------------------------
    @property
    def W_U(self) -> Tensor:  # [d_model, d_vocab]
        return (self.embed.W_E if self.unembed.lm_head is None else self.unembed.lm_head).T

    @property
    def b_U(self) -> Tensor:  # [d_vocab]; T5 has no unembedding bias
        return torch.zeros(self.cfg.d_vocab, dtype=self.W_E.dtype, device=self.W_E.device)

    def _self_attns(self) -> list[Attention]:  # encoder layers, then decoder layers (as TransformerLens)
        return [b.attn for b in self.encoder] + [b.attn for b in self.decoder]

    def _cross_attns(self) -> list[Attention]:
        return [b.cross_attn for b in self.decoder]

    # Cross-attention weights, decoder layers only.
    W_Q_cross = property(lambda self: torch.stack([a.W_Q for a in self._cross_attns()]))  # [L_dec,H,d_model,d_head]
    W_K_cross = property(lambda self: torch.stack([a.W_K for a in self._cross_attns()]))
    W_V_cross = property(lambda self: torch.stack([a.W_V for a in self._cross_attns()]))
    W_O_cross = property(lambda self: torch.stack([a.W_O for a in self._cross_attns()]))  # [L_dec,H,d_head,d_model]

    @property
    def QK_cross(self) -> FactoredMatrix:  # [L_dec,H,d_model,d_model] (decoder query x encoder key)
        return FactoredMatrix(self.W_Q_cross, self.W_K_cross.transpose(-2, -1))

    @property
    def OV_cross(self) -> FactoredMatrix:  # [L_dec,H,d_model,d_model]
        return FactoredMatrix(self.W_V_cross, self.W_O_cross)

    def all_head_labels(self, stack: Literal["encoder", "decoder", "cross"] | None = None) -> list[str]:
        """Without `stack`, TransformerLens's labels in the order of the stacked weights: "EL{l}H{h}" per encoder
        head, then "DL{l}H{h}" per decoder self-attention head. With it, "L{l}H{h}" per head of that stack
        ("L{l}H{h}_cross" for cross-attention), as `ActivationCache.stack_head_results` labels them."""
        H = self.cfg.n_heads
        if stack is None:
            return [f"EL{l}H{h}" for l in range(self.cfg.n_layers) for h in range(H)] + [
                f"DL{l}H{h}" for l in range(self.cfg.n_decoder_layers) for h in range(H)
            ]
        layers = {
            "encoder": self.cfg.n_layers,
            "decoder": self.cfg.n_decoder_layers,
            "cross": self.cfg.n_decoder_layers,
        }
        if stack not in layers:
            raise ValueError(f"stack={stack!r}; valid: None, 'encoder', 'decoder', 'cross'")
        suffix = "_cross" if stack == "cross" else ""
        return [f"L{l}H{h}{suffix}" for l in range(layers[stack]) for h in range(H)]


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
