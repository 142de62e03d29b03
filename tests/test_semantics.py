"""Regression tests for T5 semantics that hooked T5 implementations have got wrong."""

import pytest
import torch
from t5_fixtures import hf_t5, hooked_from, random_batch

from t5hooks import HookedEncoderDecoder, HookedT5Config
from t5hooks.kernels import relative_position_bucket


@pytest.fixture(scope="module")
def model():
    return hooked_from(hf_t5("t5_v1_1"))


def test_decoder_self_attention_is_causal(model):
    tokens, mask, dec, _ = random_batch(model.cfg.d_vocab, 1, 9, 12)
    changed = dec.clone()
    changed[0, 7:] = (changed[0, 7:] + 5) % model.cfg.d_vocab
    with torch.no_grad():
        a, b = model(tokens, dec), model(tokens, changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    _, cache = model.run_with_cache(tokens, dec, names_filter="decoder.*.attn.hook_pattern")
    for pattern in cache.values():
        assert torch.all(pattern.triu(diagonal=1) == 0)


def test_decoder_bias_uses_unidirectional_buckets(model):
    """Decoder position bias must use one-sided buckets: future keys share bucket 0, and the past gets all
    `num_buckets` buckets (a bidirectional decoder bias was hidden for years by one-token decoder tests)."""
    tokens, _, dec, _ = random_batch(model.cfg.d_vocab, 1, 5, 30)
    _, cache = model.run_with_cache(
        tokens, dec, names_filter=["decoder.0.attn.rel_pos_hook", "encoder.0.attn.rel_pos_hook"]
    )
    table = model.decoder[0].attn.rel_bias_table
    rel = torch.arange(30)[None, :] - torch.arange(30)[:, None]
    nb, md = model.cfg.relative_attention_num_buckets, model.cfg.relative_attention_max_distance
    uni = relative_position_bucket(rel, bidirectional=False, num_buckets=nb, max_distance=md)
    bi = relative_position_bucket(rel, bidirectional=True, num_buckets=nb, max_distance=md)
    assert not torch.equal(uni, bi)
    torch.testing.assert_close(cache["decoder.0.attn.rel_pos_hook"][0], table[uni].permute(2, 0, 1))
    enc_table = model.encoder[0].attn.rel_bias_table
    enc_rel = torch.arange(5)[None, :] - torch.arange(5)[:, None]
    enc_buckets = relative_position_bucket(enc_rel, bidirectional=True, num_buckets=nb, max_distance=md)
    torch.testing.assert_close(cache["encoder.0.attn.rel_pos_hook"][0], enc_table[enc_buckets].permute(2, 0, 1))


def test_encoder_padding_masks_self_and_cross_attention(model):
    tokens, mask, dec, _ = random_batch(model.cfg.d_vocab, 2, 10, 6)
    assert mask[1].sum() < 10
    other = tokens.clone()
    other[mask == 0] = 77  # change only padded positions
    with torch.no_grad():
        a, cache_a = model.run_with_cache(tokens, dec, one_zero_attention_mask=mask, names_filter="*pattern")
        b, _ = model.run_with_cache(other, dec, one_zero_attention_mask=mask, names_filter="*pattern")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    pad_keys = mask[1] == 0
    assert torch.all(cache_a["encoder.0.attn.hook_pattern"][1][..., pad_keys] == 0)
    assert torch.all(cache_a["decoder.0.cross_attn.hook_pattern"][1][..., pad_keys] == 0)


def test_decoder_attention_mask_pads_decoder_keys(model):
    tokens, mask, dec, _ = random_batch(model.cfg.d_vocab, 1, 6, 8)
    dec_mask = torch.ones_like(dec)
    dec_mask[0, 1:3] = 0  # hide two early decoder keys from later queries
    other = dec.clone()
    other[0, 1:3] = 50
    with torch.no_grad():
        a, cache = model.run_with_cache(
            tokens, dec, decoder_attention_mask=dec_mask, names_filter="decoder.0.attn.hook_pattern"
        )
        b, _ = model.run_with_cache(
            tokens, other, decoder_attention_mask=dec_mask, names_filter="decoder.0.attn.hook_pattern"
        )
    torch.testing.assert_close(a[:, 3:], b[:, 3:], atol=1e-6, rtol=0)
    assert torch.all(cache["decoder.0.attn.hook_pattern"][0, :, 3:, 1:3] == 0)


def test_no_inverse_sqrt_scaling(model):
    tokens, _, dec, _ = random_batch(model.cfg.d_vocab, 1, 7, 3)
    _, cache = model.run_with_cache(tokens, dec, names_filter=["encoder.1.attn.*", "encoder.0.attn.rel_pos_hook"])
    q, k = cache["encoder.1.attn.hook_q"], cache["encoder.1.attn.hook_k"]
    expected = torch.einsum("bqhd,bkhd->bhqk", q, k) + cache["encoder.0.attn.rel_pos_hook"]
    torch.testing.assert_close(cache["encoder.1.attn.hook_attn_scores"], expected, atol=1e-5, rtol=0)


def test_position_bias_patch_changes_every_layer(model):
    tokens, _, dec, _ = random_batch(model.cfg.d_vocab, 1, 7, 3)
    names = [f"encoder.{l}.attn.hook_attn_scores" for l in range(model.cfg.n_layers)]
    _, clean = model.run_with_cache(tokens, dec, names_filter=names)

    def zero_bias(bias, hook):
        return torch.zeros_like(bias)

    with model.hooks(fwd_hooks=[("encoder.0.attn.rel_pos_hook", zero_bias)]):
        _, patched = model.run_with_cache(tokens, dec, names_filter=names + ["encoder.*.attn.hook_[qk]"])
    for layer in range(model.cfg.n_layers):
        q, k = patched[f"encoder.{layer}.attn.hook_q"], patched[f"encoder.{layer}.attn.hook_k"]
        torch.testing.assert_close(patched[names[layer]], torch.einsum("bqhd,bkhd->bhqk", q, k), atol=1e-5, rtol=0)
        assert not torch.allclose(patched[names[layer]], clean[names[layer]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_softmax_and_norm_in_fp32(dtype):
    hf = hf_t5("t5_v1_1")
    ref = hooked_from(hf)
    half = hooked_from(hf, dtype=dtype)
    tokens, mask, dec, _ = random_batch(ref.cfg.d_vocab, 2, 9, 5)
    names = ["encoder.0.attn.hook_pattern", "encoder.0.ln1.hook_scale", "decoder.1.cross_attn.hook_pattern"]
    with torch.no_grad():
        ref_logits, ref_cache = ref.run_with_cache(tokens, dec, one_zero_attention_mask=mask, names_filter=names)
        logits, cache = half.run_with_cache(tokens, dec, one_zero_attention_mask=mask, names_filter=names)
    assert logits.dtype == dtype
    for name in names:
        assert cache[name].dtype == torch.float32, name
        torch.testing.assert_close(cache[name], ref_cache[name], atol=3e-2, rtol=3e-2)
    rel_err = (logits.float() - ref_logits).abs().max() / ref_logits.abs().max()
    assert rel_err < 0.02, rel_err


def test_fp16_overflow_clamp_matches_hf():
    hf = hf_t5("t5_v1_0")
    with torch.no_grad():  # make the encoder's first MLP overflow fp16
        hf.encoder.block[0].layer[1].DenseReluDense.wo.weight.mul_(3e4)
    model = hooked_from(hf, dtype=torch.float16)
    hf = hf.half()
    tokens, mask, dec, _ = random_batch(model.cfg.d_vocab, 1, 8, 4, pad_encoder=False)
    with torch.no_grad():
        ref = hf(input_ids=tokens, decoder_input_ids=dec, output_hidden_states=True)
        logits, cache = model.run_with_cache(tokens, dec, names_filter="encoder.0.hook_resid_post")
    resid = cache["encoder.0.hook_resid_post"]
    assert torch.isfinite(resid).all()
    assert resid.abs().max() >= torch.finfo(torch.float16).max - 1000  # clamped, not inf
    expected = ref.encoder_hidden_states[1].float()
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(resid.float(), expected, atol=2e-3 * expected.abs().max().item(), rtol=0)
    assert torch.isfinite(logits).all() and torch.isfinite(ref.logits).all()


def test_weights_initialised_from_config():
    cfg = HookedT5Config(d_model=32, d_head=8, n_heads=4, d_mlp=64, n_layers=2, d_vocab=50, seed=3)
    a, b = HookedEncoderDecoder(cfg), HookedEncoderDecoder(HookedT5Config(**{**cfg.to_dict(), "seed": 3}))
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, q), name  # seeded: reproducible
    std = a.encoder[0].attn.k_proj.std().item()
    assert abs(std - 32**-0.5) < 0.05
    assert torch.all(a.encoder[0].ln1.w == 1)
