"""HookedT5Base: what both hooked T5 models share — the encoder stack and everything that is not the decoder.

It builds and runs the token embedding, the encoder blocks and the encoder's final norm (hook names
`hook_embed`, `encoder.{l}.…`, `encoder_final_ln.*`, `hook_encoder_out`), and holds input checking, the
tokenizer helpers, device/dtype moves, stacked weight views and loading. `HookedEncoderDecoder` (model.py)
adds the decoder and unembedding; `HookedT5Encoder` (encoder.py) returns the encoder's last hidden state.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from .allocation import check_allocation
from .analysis.cache import ActivationCache
from .analysis.factored_matrix import FactoredMatrix
from .components import RESID, Attention, Embed, EncoderBlock, RMSNorm, attention_context, optional_hook
from .config import HookedT5Config
from .dtypes import parse_dtype
from .hook_io import HookIO, is_tracing
from .hook_points import HookedRootModule, HookPoint
from .padding import warn_if_right_padded
from .regions import run_encoder_block

TextOrTokens = Union[Tensor, str, Sequence[str]]


def as_config(cfg: HookedT5Config | dict[str, Any], **overrides: Any) -> HookedT5Config:
    """The model's own copy of `cfg` with `overrides` applied (the reference's constructor `**kwargs`): moving or
    converting the model never changes the caller's config."""
    if isinstance(cfg, dict):
        cfg = HookedT5Config.from_dict({**cfg, **overrides})
    elif isinstance(cfg, HookedT5Config) and overrides:
        cfg = HookedT5Config.from_dict({**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, **overrides})
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
        # the weights the config implies must fit where they are built and where they go (ValueError naming the
        # field otherwise), before any is allocated; nothing to check when building on the meta device
        decoder = not self.discards("decoder.0.attn.q_proj")
        for device in {torch.empty(()).device, *([torch.device(cfg.device)] if cfg.device else [])}:
            check_allocation(cfg, cfg.dtype, device, "HookedT5Config", decoder=decoder)
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
        self._toggle_hooks(self.attention_layers(), ["hook_result"], use_attn_result)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Toggle `{s}.{l}.hook_mlp_in`: the pre-norm residual as only the MLP reads it (on by default here)."""
        self.cfg.use_hook_mlp_in = use_hook_mlp_in
        self._toggle_hooks(self.blocks(), ["hook_mlp_in"], use_hook_mlp_in)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Toggle `{s}.{l}.hook_attn_in` and `decoder.{l}.hook_cross_attn_in`: the attention inputs as one copy
        per head `[B,pos,H,d_model]` (before the norm), so a hook can patch one head's input."""
        self.cfg.use_attn_in = use_attn_in
        self._toggle_hooks(self.blocks(), ["hook_attn_in"], use_attn_in)
        self._toggle_hooks([b for b in self.blocks() if hasattr(b, "cross_attn")], ["hook_cross_attn_in"], use_attn_in)

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

    # ---- forward -----------------------------------------------------------------------
    def encode(self, tokens: Tensor, attention_mask: Tensor | None = None, io: HookIO | None = None) -> Tensor:
        """Encoder stack: tokens `[B,E]` (mask `[B,E]`, 1 = real token) -> `hook_encoder_out` `[B,E,d_model]`."""
        B, E = tokens.shape
        mask = None if attention_mask is None else attention_mask.bool()
        resid = self.hook_embed(self.embed(tokens), io)
        attns = [block.attn for block in self.encoder]
        ctx = attention_context(attns[0], attns, E, E, mask, io, resid.device)
        for block in self.encoder:
            resid = run_encoder_block(block, resid, ctx, io)
        return self.hook_encoder_out(self.encoder_final_ln(resid, io), io)

    # ---- input handling ----------------------------------------------------------------
    def prepare_encoder_inputs(
        self, input: TextOrTokens, attention_mask: Tensor | None = None, warn_padding: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Tokens and mask, checked and on the model's device, from text (the mask comes from the tokenizer's
        padding, unless one is given), token ids, or the `(tokens, attention_mask)` pair `to_tokens` returns.

        No mask means every token is attended (the reference's words; TransformerLens 3.9 and Hugging Face do the
        same): a mask is never inferred from pad ids. A token batch without a mask that looks right-padded (EOS
        then pads) warns, on every such call (`warn_padding=False` when the caller has already checked)."""
        input, attention_mask = self._split_pair(input, attention_mask, "input", "one_zero_attention_mask")
        tokens, text_mask = self._tokens_and_mask(input, "input")
        if attention_mask is None:
            attention_mask = text_mask
            if attention_mask is None and warn_padding and not is_tracing():
                warn_if_right_padded(tokens, self.cfg.eos_token_id, self.cfg.pad_token_id)
        attention_mask = self._check_mask(attention_mask, tokens, "one_zero_attention_mask")
        return tokens.to(self.embed.W_E.device), attention_mask

    @staticmethod
    def _split_pair(value: Any, mask: Tensor | None, what: str, mask_name: str) -> tuple[Any, Tensor | None]:
        """`(tokens, attention_mask)` as `to_tokens` returns it -> tokens and mask; anything else unchanged."""
        if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, Tensor) for v in value):
            if mask is not None:
                raise ValueError(
                    f"{what} is a (tokens, attention_mask) pair (what to_tokens returns) and {mask_name} is given "
                    f"too; pass the mask once"
                )
            return value
        return value, mask

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

    # ---- tokenizer ---------------------------------------------------------------------
    def _tokenize(
        self, text: str | Sequence[str], add_special_tokens: bool = True, truncate: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Right-padded ids and mask `[batch, pos]`; truncated to `cfg.n_ctx` tokens (when known) as TransformerLens."""
        batch = [text] if isinstance(text, str) else list(text)
        kwargs = {}
        if truncate and self.cfg.n_ctx is not None:
            kwargs = dict(truncation=True, max_length=self.cfg.n_ctx)
        out = self.tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens, **kwargs)
        return out["input_ids"].long(), out["attention_mask"].long()

    def _tokenize_decoder(self, text: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Decoder text -> (start token + text tokens, mask): no EOS, so the model continues the text."""
        tokens, mask = self._tokenize(text, add_special_tokens=False, truncate=False)
        start = torch.full((tokens.shape[0], 1), self.cfg.decoder_start_token_id, dtype=tokens.dtype)
        return torch.cat([start, tokens], dim=1), torch.cat([torch.ones_like(start), mask], dim=1)

    def to_tokens(
        self, input: str | Sequence[str], move_to_device: bool = True, truncate: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Text -> `(tokens, attention_mask)`, both `[batch, pos]`, as TransformerLens 3.9's
        `HookedEncoderDecoder.to_tokens`: right-padded with the pad token, EOS appended by the tokenizer as T5
        expects, truncated to `cfg.n_ctx` tokens (HF's `n_positions`, when the checkpoint has one) unless
        `truncate=False`. The pair goes straight back in: `model(model.to_tokens(texts), decoder_input)`."""
        if self.tokenizer is None:
            raise ValueError("to_tokens needs a tokenizer: load the model with tokenizer=...")
        tokens, mask = self._tokenize(input, truncate=truncate)
        if move_to_device:
            tokens, mask = tokens.to(self.embed.W_E.device), mask.to(self.embed.W_E.device)
        return tokens, mask

    def to_decoder_tokens(self, input: str | Sequence[str], move_to_device: bool = True) -> Tensor:
        """Decoder text -> ids `[batch, 1 + pos]`: the start token, then the text without EOS (what text passed
        as `decoder_input` becomes; rows of a batch are right-padded with the pad token)."""
        if self.tokenizer is None:
            raise ValueError("to_decoder_tokens needs a tokenizer: load the model with tokenizer=...")
        tokens, _ = self._tokenize_decoder(input)
        return tokens.to(self.embed.W_E.device) if move_to_device else tokens

    def to_string(self, tokens: Tensor | Sequence[int]) -> str | list[str]:
        """Token ids -> text (a list of strings for a batch), decoded as TransformerLens does: special tokens kept
        and spaces not cleaned up (so " ," stays " ,")."""
        if self.tokenizer is None:
            raise ValueError("to_string needs a tokenizer: load the model with tokenizer=...")
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return [self.tokenizer.decode(row.tolist(), clean_up_tokenization_spaces=False) for row in tokens]
        if tokens.ndim > 2:
            raise ValueError(f"to_string takes ids [pos] or [batch, pos], got shape {tuple(tokens.shape)}")
        return self.tokenizer.decode(tokens.reshape(-1).tolist(), clean_up_tokenization_spaces=False)

    def to_str_tokens(self, input: str | Tensor | Sequence[Any]) -> list[str] | list[list[str]]:
        """One string per token, for labelling plots. A string or one sequence of ids gives a list; a list of
        strings or a `[batch, pos]` tensor (batch > 1) gives one list per row, as TransformerLens."""
        if self.tokenizer is None:
            raise ValueError("to_str_tokens needs a tokenizer: load the model with tokenizer=...")
        if isinstance(input, (list, tuple)) and input and isinstance(input[0], str):
            return [self.to_str_tokens(text) for text in input]
        if isinstance(input, str):
            tokens = self.to_tokens(input, move_to_device=False)[0][0]
        else:
            tokens = torch.as_tensor(input)
            if tokens.ndim == 2:
                if tokens.shape[0] != 1:
                    return [self.to_str_tokens(row) for row in tokens]
                tokens = tokens[0]
        label = getattr(self.tokenizer, "str_tokens", None)  # a tokenizer that labels its own tokens
        if callable(label):
            return label(tokens.tolist())
        return [self.tokenizer.decode([t], clean_up_tokenization_spaces=False) for t in tokens.reshape(-1).tolist()]

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
    ) -> HookedT5Base:
        """Load a T5-family model: a Hugging Face hub name, a local `save_pretrained` directory (`subfolder=` for a
        diffusers pipeline's `text_encoder_2/`), a safetensors / GGUF file, an embedded model (`t5hooks-tiny`), or
        a live HF model (`hf_model=`). The reference's signature and positional order. `HookedEncoderDecoder`
        refuses an encoder-only checkpoint (a diffusion pipeline's text encoder) with a pointer to `HookedT5Encoder`.

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
        dtype = parse_dtype(dtype, allow_auto=True, default=torch.float32)
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

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use `tokenizer` (any Hugging Face tokenizer) for text inputs."""
        self.tokenizer = tokenizer

    def to(self, *args: Any, print_details: bool = True, **kwargs: Any) -> HookedT5Base:
        """nn.Module.to; also the reference's `to(device_or_dtype, print_details)` (details are logged at info)."""
        if len(args) == 2 and isinstance(args[1], bool):
            args, print_details = args[:1], args[1]
        result = super().to(*args, **kwargs)
        if print_details:
            logging.getLogger(__name__).info("moved model to %s, %s", self.cfg.device, self.cfg.dtype)
        return result

    def _apply(self, fn: Any, recurse: bool = True) -> HookedT5Base:
        """Every move or conversion (`to`, `half`, `bfloat16`, `float`, `cuda`, ...) keeps the run options
        `cfg.device` / `cfg.dtype` in step with the weights (`cfg` is the model's own copy)."""
        result = super()._apply(fn, recurse)
        self.cfg.device = str(self.embed.W_E.device)
        self.cfg.dtype = self.embed.W_E.dtype
        return result

    def cpu(self) -> HookedT5Base:
        return self.to("cpu")

    def cuda(self, device: int | str | torch.device | None = None) -> HookedT5Base:
        return self.to(
            torch.device("cuda")
            if device is None
            else torch.device("cuda", device)
            if isinstance(device, int)
            else device
        )

    def mps(self) -> HookedT5Base:
        return self.to("mps")

    # ---- weights, TransformerLens names --------------------------------------------------
    @property
    def W_E(self) -> Tensor:  # [d_vocab, d_model]
        return self.embed.W_E

    @property
    def W_pos(self) -> None:
        """None: T5 has no absolute positional embedding. Its relative position bias tables are
        `encoder[0].attn.rel_bias_table` (and `decoder[0]`'s), `[num_buckets, n_heads]` (UMT5: one per layer); the
        bias itself is the `rel_pos_hook` activation. (TransformerLens's T5 raises NotImplementedError here; a
        property that raises breaks tools that walk a module's attributes, `torch.jit.trace` and `hasattr` among
        them.)"""
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
