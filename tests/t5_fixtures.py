"""Small randomly initialised Hugging Face T5 models of each family member, built offline from a T5Config."""

from __future__ import annotations

import torch
from transformers import T5Config, T5ForConditionalGeneration

from t5hooks import HookedEncoderDecoder

# Tiny shapes; the vocabularies of ByT5 and mT5 are the real ones.
VARIANTS = {
    # T5 v1.0: ReLU MLP, tied embeddings, logits scaled by d_model**-0.5
    "t5_v1_0": dict(vocab_size=128, feed_forward_proj="relu", tie_word_embeddings=True, num_layers=2),
    # T5 v1.1 / Flan-T5: gated-GELU, untied lm_head, encoder deeper than decoder
    "t5_v1_1": dict(
        vocab_size=128, feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_layers=3, num_decoder_layers=2
    ),
    # ByT5: byte vocabulary (384), deep encoder / shallow decoder
    "byt5": dict(
        vocab_size=384, feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_layers=3, num_decoder_layers=1
    ),
    # mT5: 250k vocabulary
    "mt5": dict(vocab_size=250112, feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_layers=2, d_model=16),
    # gated SiLU MLP, unusual bucket settings
    "gated_silu": dict(
        vocab_size=96,
        feed_forward_proj="gated-silu",
        tie_word_embeddings=False,
        num_layers=2,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=40,
    ),
}
BASE = dict(
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    dropout_rate=0.0,
    decoder_start_token_id=0,
)


def hf_t5(variant: str, seed: int = 0) -> T5ForConditionalGeneration:
    """An eval-mode HF T5 with eager attention (so it returns attention patterns) and every weight random,
    layer norms and (when untied) lm_head included."""
    torch.manual_seed(seed)
    cfg = T5Config(**{**BASE, **VARIANTS[variant]})
    model = T5ForConditionalGeneration._from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
        if not VARIANTS[variant]["tie_word_embeddings"]:
            # transformers 5.x ties lm_head at init even with tie_word_embeddings=False: untie explicitly.
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    return model.eval()


def hooked_from(hf_model: T5ForConditionalGeneration, **kwargs) -> HookedEncoderDecoder:
    return HookedEncoderDecoder.from_pretrained("test-model", hf_model=hf_model, **kwargs)


def random_batch(
    vocab: int,
    batch: int,
    enc_len: int,
    dec_len: int,
    seed: int = 0,
    pad_encoder: bool = True,
    pad_decoder: bool = False,
):
    """Tokens avoiding special ids, with right padding of decreasing length per row."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (batch, enc_len), generator=g)
    dec = torch.randint(3, vocab, (batch, dec_len), generator=g)
    mask = torch.ones(batch, enc_len, dtype=torch.long)
    dec_mask = torch.ones(batch, dec_len, dtype=torch.long)
    for row in range(1, batch):
        if pad_encoder:
            keep = max(1, enc_len - 3 * row)
            mask[row, keep:] = 0
            tokens[row, keep:] = 0
        if pad_decoder and dec_len > 1:
            keep = max(1, dec_len - 2 * row)
            dec_mask[row, keep:] = 0
            dec[row, keep:] = 0
    return tokens, mask, dec, dec_mask


# UMT5: gated-GELU, a relative position bias table in every self-attention layer, untied lm_head.
UMT5_BASE = dict(
    vocab_size=160,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_heads=4,
    num_layers=3,
    num_decoder_layers=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    dropout_rate=0.0,
    decoder_start_token_id=0,
)


def randomise(model, untie_lm_head: bool = True):
    """Random layer norms (and an untied random lm_head) so every weight matters in a parity test."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
        if untie_lm_head and hasattr(model, "lm_head"):
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    return model.eval()


def hf_umt5(seed: int = 0, **overrides):
    """An eval-mode HF UMT5ForConditionalGeneration (eager attention), every weight random."""
    from transformers import UMT5Config, UMT5ForConditionalGeneration

    torch.manual_seed(seed)
    values = {**UMT5_BASE, **overrides}
    model = UMT5ForConditionalGeneration._from_config(UMT5Config(**values), attn_implementation="eager")
    return randomise(model, untie_lm_head=not values["tie_word_embeddings"])


ENCODER_CONFIGS = {
    # T5 v1.1 / Flan-T5-XXL style text encoder (Flux, SD3, PixArt): gated-GELU
    "t5": ("T5Config", "T5EncoderModel", dict(vocab_size=128, feed_forward_proj="gated-gelu", num_layers=3)),
    # mT5
    "mt5": ("MT5Config", "MT5EncoderModel", dict(vocab_size=150, feed_forward_proj="gated-gelu", num_layers=2)),
    # umT5 (Wan): a bias table per layer
    "umt5": ("UMT5Config", "UMT5EncoderModel", dict(vocab_size=160, feed_forward_proj="gated-gelu", num_layers=3)),
}


def hf_encoder(family: str, seed: int = 0, **overrides):
    """An eval-mode HF T5EncoderModel / MT5EncoderModel / UMT5EncoderModel, eager attention, every weight random."""
    import transformers

    config_cls, model_cls, values = ENCODER_CONFIGS[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**{**BASE, **values, **overrides})
    model = getattr(transformers, model_cls)._from_config(cfg, attn_implementation="eager")
    return randomise(model, untie_lm_head=False)


def sentencepiece_tokenizer():
    """A T5-style fast tokenizer built in memory (no hub): a Unigram model over `▁`-prefixed words and single
    characters with Metaspace pre-tokenizing and decoding, `<pad>`=0, `</s>`=1 appended to every text, `<unk>`=2,
    and `clean_up_tokenization_spaces=True` as real T5 tokenizers have (so decoding " ," differs with and without
    the clean-up). 94 pieces: every id fits the 128-id test vocabularies."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "▁hello", "▁world", "▁the", "▁cat", "▁sat", "▁on", "▁mat", "▁.", ".", ","]
    pieces += ["▁,", "'s", "▁a", "▁is"]
    for char in string.ascii_lowercase + string.digits + "!?'":
        pieces += ["▁" + char, char]
    pieces = list(dict.fromkeys(pieces))
    scores = [0.0] * 3 + [-len(p) / 10 - i / 1000 for i, p in enumerate(pieces[3:])]
    tokenizer = Tokenizer(models.Unigram(list(zip(pieces, scores)), unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=True,
    )
