"""Parity with Hugging Face transformers' T5 on randomly initialised models of every family member.

Compares logits, every HF hidden state, HF self- and cross-attention patterns with the matching
hook points (fp32, atol 1e-4), with padded encoder batches, decoder lengths 1 / 7 / 33 and
decoder padding.
"""

import pytest
import torch
from t5_fixtures import VARIANTS, hf_t5, hooked_from, random_batch

ATOL = 1e-4


def compare_to_hf(variant: str, dec_len: int, pad_decoder: bool, batch: int = 3, enc_len: int = 13):
    hf = hf_t5(variant)
    model = hooked_from(hf)
    cfg = model.cfg
    tokens, mask, dec, dec_mask = random_batch(cfg.d_vocab, batch, enc_len, dec_len, pad_decoder=pad_decoder)
    with torch.no_grad():
        ref = hf(
            input_ids=tokens,
            attention_mask=mask,
            decoder_input_ids=dec,
            decoder_attention_mask=dec_mask,
            output_hidden_states=True,
            output_attentions=True,
        )
        logits, cache = model.run_with_cache(tokens, dec, one_zero_attention_mask=mask, decoder_attention_mask=dec_mask)

    torch.testing.assert_close(logits, ref.logits, atol=ATOL, rtol=0)
    # HF hidden states: the embedding, the output of every block but the last, then the final-norm output.
    enc_names = (
        ["hook_embed"] + [f"encoder.{l}.hook_resid_post" for l in range(cfg.n_layers - 1)] + ["hook_encoder_out"]
    )
    assert len(ref.encoder_hidden_states) == len(enc_names)
    for name, hidden in zip(enc_names, ref.encoder_hidden_states):
        torch.testing.assert_close(cache[name], hidden, atol=ATOL, rtol=0, msg=name)
    dec_names = ["hook_decoder_embed"] + [f"decoder.{l}.hook_resid_post" for l in range(cfg.n_decoder_layers - 1)]
    for name, hidden in zip(dec_names, ref.decoder_hidden_states[:-1]):
        torch.testing.assert_close(cache[name], hidden, atol=ATOL, rtol=0, msg=name)
    final = cache["unembed.hook_in"] / (cfg.d_model**-0.5 if cfg.scale_logits else 1.0)
    torch.testing.assert_close(final, ref.decoder_hidden_states[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(cache["hook_encoder_out"], ref.encoder_last_hidden_state, atol=ATOL, rtol=0)
    for layer in range(cfg.n_layers):
        torch.testing.assert_close(
            cache[f"encoder.{layer}.attn.hook_pattern"], ref.encoder_attentions[layer], atol=ATOL, rtol=0
        )
    for layer in range(cfg.n_decoder_layers):
        torch.testing.assert_close(
            cache[f"decoder.{layer}.attn.hook_pattern"], ref.decoder_attentions[layer], atol=ATOL, rtol=0
        )
        torch.testing.assert_close(
            cache[f"decoder.{layer}.cross_attn.hook_pattern"], ref.cross_attentions[layer], atol=ATOL, rtol=0
        )
    return model, cache


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_padded_encoder_multitoken_decoder(variant):
    compare_to_hf(variant, dec_len=7, pad_decoder=False)


@pytest.mark.parametrize("dec_len", [1, 33])
@pytest.mark.parametrize("variant", ["t5_v1_0", "t5_v1_1"])
def test_parity_decoder_lengths(variant, dec_len):
    compare_to_hf(variant, dec_len=dec_len, pad_decoder=False)


@pytest.mark.parametrize("variant", ["t5_v1_0", "t5_v1_1", "byt5"])
def test_parity_decoder_padding(variant):
    compare_to_hf(variant, dec_len=9, pad_decoder=True)


def test_loss_and_labels_match_hf():
    hf = hf_t5("t5_v1_1")
    model = hooked_from(hf)
    tokens, mask, labels, _ = random_batch(model.cfg.d_vocab, 2, 10, 6)
    labels[1, 4:] = -100
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=mask, labels=labels)
        logits, loss = model(tokens, one_zero_attention_mask=mask, labels=labels, return_type="both")
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, ref.logits, atol=ATOL, rtol=0)


def test_v1_0_is_tied_and_scaled_v1_1_is_not():
    tied = hooked_from(hf_t5("t5_v1_0"))
    untied = hooked_from(hf_t5("t5_v1_1"))
    assert tied.cfg.tie_word_embeddings and tied.cfg.scale_logits and tied.unembed.lm_head is None
    assert tied.W_U.data_ptr() == tied.W_E.data_ptr()
    assert not untied.cfg.tie_word_embeddings and not untied.cfg.scale_logits
    assert not torch.equal(untied.W_U, untied.W_E.T)
