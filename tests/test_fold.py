"""fold_ln: RMSNorm weights folded into the following weights change no logit and no residual stream."""

import pytest
import torch
from t5_fixtures import hf_t5, hooked_from, random_batch

from t5hooks import HookedEncoderDecoder
from t5hooks.components import RMSNorm

RESID = lambda name: ".hook_resid_" in name  # noqa: E731


def batch(model):
    tokens, mask, dec, _ = random_batch(model.cfg.d_vocab, 2, 7, 5)
    return tokens, mask, dec


def run(model, tokens, mask, dec):
    with torch.no_grad():
        return model.run_with_cache(tokens, dec, one_zero_attention_mask=mask)


@pytest.mark.parametrize("variant", ["t5_v1_0", "t5_v1_1"])
def test_fold_ln_preserves_logits_and_residual_streams(variant):
    hf = hf_t5(variant)
    hf_state = {k: v.clone() for k, v in hf.state_dict().items()}
    model = hooked_from(hf)  # shares storage with `hf`: folding must not write into it
    tied = model.cfg.tie_word_embeddings
    assert tied == (variant == "t5_v1_0")
    tokens, mask, dec = batch(model)
    logits, cache = run(model, tokens, mask, dec)
    encoder_final_w = model.encoder_final_ln.w.detach().clone()

    assert model.fold_ln() is model
    folded_logits, folded = run(model, tokens, mask, dec)
    torch.testing.assert_close(folded_logits, logits, atol=1e-5, rtol=1e-5)
    resid_names = [n for n in cache if RESID(n)]
    assert len(resid_names) == 3 * model.cfg.n_layers + 4 * model.cfg.n_decoder_layers
    for name in resid_names:
        torch.testing.assert_close(folded[name], cache[name], atol=1e-5, rtol=1e-5, msg=name)
    for name in ("decoder.1.cross_attn.hook_pattern", "encoder.0.attn.hook_z", "decoder.0.cross_attn.hook_k"):
        torch.testing.assert_close(folded[name], cache[name], atol=1e-5, rtol=1e-5, msg=name)
    assert all(torch.equal(m.w, torch.ones_like(m.w)) for m in model.modules() if isinstance(m, RMSNorm))
    # hook_encoder_out is now the normalised encoder output; the weight lives in the cross-attention K/V.
    torch.testing.assert_close(folded["hook_encoder_out"], cache["encoder_final_ln.hook_normalized"])
    torch.testing.assert_close(folded["hook_encoder_out"] * encoder_final_w, cache["hook_encoder_out"])
    # The Hugging Face model it was loaded from is untouched and still agrees.
    for name, value in hf.state_dict().items():
        assert torch.equal(value, hf_state[name]), name
    with torch.no_grad():
        hf_logits = hf(input_ids=tokens, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(folded_logits, hf_logits, atol=1e-5, rtol=1e-5)
    # Untying: the unembedding is its own parameter now, the embedding is unchanged.
    assert model.cfg.tie_word_embeddings is False
    assert "unembed.lm_head" in dict(model.named_parameters())
    assert torch.equal(model.W_E, hf_state["shared.weight"])
    assert model.unembed.lm_head.data_ptr() != model.W_E.data_ptr()
    # Folding again changes nothing.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.fold_ln()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("variant", ["t5_v1_0", "t5_v1_1"])
def test_from_pretrained_fold_ln(variant):
    hf = hf_t5(variant)
    hf_state = {k: v.clone() for k, v in hf.state_dict().items()}
    model = hooked_from(hf, fold_ln=True)
    assert all(torch.equal(m.w, torch.ones_like(m.w)) for m in model.modules() if isinstance(m, RMSNorm))
    tokens, mask, dec = batch(model)
    with torch.no_grad():
        hf_logits = hf(input_ids=tokens, attention_mask=mask, decoder_input_ids=dec).logits
        logits = model(tokens, dec, one_zero_attention_mask=mask)
    torch.testing.assert_close(logits, hf_logits, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v, hf_state[k]) for k, v in hf.state_dict().items())
    unfolded = hooked_from(hf)
    torch.testing.assert_close(unfolded(tokens, dec, one_zero_attention_mask=mask), logits, atol=1e-5, rtol=1e-5)


def test_folded_model_attribution_uses_plain_normalisation():
    """After folding, direct logit attribution is `x / scale` (and T5's logit scaling) times W_U (the weights
    carry the norm), and it still sums to the logits."""
    model = hooked_from(hf_t5("t5_v1_0"), fold_ln=True)
    tokens, mask, dec = batch(model)
    logits, cache = run(model, tokens, mask, dec)
    parts = cache.decompose_resid(pos_slice=-1)
    scale = cache["decoder_final_ln.hook_scale"][:, -1]
    logit_scale = model.cfg.d_model**-0.5  # T5 v1.0 scales the final residual; folding leaves that in place
    torch.testing.assert_close(cache.apply_ln_to_stack(parts, pos_slice=-1), parts / scale * logit_scale)
    attrs = cache.logit_attrs(parts, 42, pos_slice=-1)
    torch.testing.assert_close(attrs.sum(0), logits[:, -1, 42], atol=1e-4, rtol=0)


def test_builtin_model_loads_folded():
    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny-random", fold_ln=True)
    reference = HookedEncoderDecoder.from_pretrained("t5hooks-tiny-random")
    with torch.no_grad():
        reference.decoder_final_ln.w.mul_(2.0)  # a non-trivial norm, folded below
        expected = reference("abc", "d")
        reference.fold_ln()
        assert torch.equal(reference.decoder_final_ln.w, torch.ones_like(reference.decoder_final_ln.w))
        torch.testing.assert_close(reference("abc", "d"), expected, atol=1e-5, rtol=1e-5)
    assert model.cfg.model_name == "t5hooks-tiny-random"
    unfolded = HookedEncoderDecoder.from_pretrained("t5hooks-tiny-random")
    torch.testing.assert_close(model("abc", "d"), unfolded("abc", "d"))
