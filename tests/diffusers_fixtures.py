"""Tiny random diffusers pipelines built offline from configs: a PixArt-α-style pipeline (a T5 text encoder alone) and
a Flux-style one (CLIP + T5), with word-level tokenizers built in memory, saved as pipeline directories."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "a red blue green cat dog bird photo of painting the on in with sky tree house car big small "
    "blurry ugly bad quality dark bright happy sad old new"
).split()
T5_VOCAB = 64  # ids 0..2 special, then the words; the rest unused
PROMPTS = ["a red cat on the tree", "photo of a big blue dog"]
NEGATIVE = "blurry bad quality"


def word_tokenizer(specials: dict[str, int], eos: str | None, model_max_length: int):
    """A `PreTrainedTokenizerFast` over `WORDS` (lower-cased, split on whitespace), `eos` appended to every text."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = dict(specials)
    for word in WORDS:
        vocab[word] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if eos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, vocab[eos])]
        )
    names = {v: k for k, v in specials.items()}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=names[min(specials.values())] if "<pad>" not in specials else "<pad>",
        eos_token=eos,
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def t5_tokenizer():
    return word_tokenizer({"<pad>": 0, "</s>": 1, "<unk>": 2}, "</s>", model_max_length=512)


def t5_encoder(seed: int = 0):
    """A T5 v1.1-style (gated-GELU) T5EncoderModel, every weight random (layer norms too)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=T5_VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_heads=4,
        num_layers=3,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    model = T5EncoderModel(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    return model.eval()


def pixart_pipeline(seed: int = 0):
    """A PixArt-α pipeline: tiny PixArt transformer (caption channels = T5 d_model), tiny VAE, DDIM scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8,), latent_channels=4, norm_num_groups=2, sample_size=16
    )
    pipe = PixArtAlphaPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=t5_encoder(seed + 2),
        vae=vae.eval(),
        transformer=transformer.eval(),
        scheduler=DDIMScheduler(clip_sample=False),  # unclipped: latents compared as computed
    )
    return pipe


def flux_pipeline(seed: int = 0):
    """A Flux pipeline: tiny CLIP text model (pooled embeddings) + tiny T5 (text_encoder_2), tiny Flux transformer,
    tiny VAE, flow-matching Euler scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=T5_VOCAB,
            hidden_act="gelu",
            projection_dim=32,
        )
    ).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=word_tokenizer({"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3}, "</s>", model_max_length=77),
        text_encoder_2=t5_encoder(seed + 3),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer.eval(),
    )


def saved(pipe, directory: Path) -> Path:
    """`pipe.save_pretrained(directory)` (safetensors weights, tokenizers, model_index.json); returns it."""
    pipe.save_pretrained(directory)
    return directory


PIXART_CALL = dict(
    num_inference_steps=2,
    guidance_scale=4.5,
    height=16,
    width=16,
    max_sequence_length=12,
    use_resolution_binning=False,
    clean_caption=False,
)
FLUX_CALL = dict(num_inference_steps=2, guidance_scale=3.5, height=8, width=8, max_sequence_length=12)
