"""HookedT5Encoder: a T5-family encoder on its own, the way diffusion pipelines use T5-XXL and umT5 as text
encoders (`T5EncoderModel` / `UMT5EncoderModel` / `MT5EncoderModel` checkpoints)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .base import HookedT5Base, TextOrTokens, as_config
from .config import HookedT5Config
from .hook_io import NameFilter
from .hook_registry import HookLayout


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

    def attention_view(
        self,
        input: TextOrTokens,
        *,
        one_zero_attention_mask: Tensor | None = None,
        batch_index: int = 0,
        layers: Sequence[int] | None = None,
    ) -> Any:
        """Run `input` and show example `batch_index`'s self-attention patterns as an interactive page
        (`t5hooks.viz.AttentionView`: displays in a notebook, `.save("attn.html")`), padded positions hidden."""
        tokens, mask = self.prepare_encoder_inputs(input, one_zero_attention_mask)
        with torch.no_grad():
            _, cache = self.run_with_cache(
                tokens, one_zero_attention_mask=mask, names_filter=lambda n: n.endswith("hook_pattern")
            )
        return cache.attention_view(
            tokens,
            batch_index=batch_index,
            attention_mask=torch.ones_like(tokens) if mask is None else mask,
            layers=layers,
            title=f"Attention · {self.cfg.model_name}",
        )

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

    def as_text_encoder(
        self,
        *,
        intervene: dict[str, nn.Module] | None = None,
        steer: dict[str, Tensor] | None = None,
        config: Any = None,
    ):
        """This encoder behind `T5EncoderModel`'s call surface, for a diffusers pipeline (`pipe.text_encoder_2 =
        encoder.as_text_encoder()`): hooks, `intervene` / `steer` edits and `capturing(...)` records act inside
        `pipe(...)`. See `t5hooks.text_encoder.T5TextEncoder`."""
        from .text_encoder import T5TextEncoder

        return T5TextEncoder(self, intervene=intervene, steer=steer, config=config)

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
