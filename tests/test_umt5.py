"""UMT5: a relative position bias table in every self-attention layer.

Parity with transformers' UMT5ForConditionalGeneration (logits, every hidden state and attention
pattern, padded batches, fp32 atol 1e-4), per-layer `rel_pos_hook`, the fused kernel path per layer
(interpreted on CPU) against eager, loading from a saved checkpoint, capture, ONNX and generation.
"""

import os

import pytest
import torch
from t5_fixtures import hf_umt5, random_batch

from t5hooks import HookedEncoderDecoder, HookedT5Config

ATOL = 1e-4


def hooked(hf, **kwargs):
    return HookedEncoderDecoder.from_pretrained("umt5-test", hf_model=hf, **kwargs)


def test_config_and_tables_per_layer():
    model = hooked(hf_umt5())
    assert model.cfg.per_layer_position_bias
    for stack in (model.encoder, model.decoder):
        assert all(block.attn.rel_bias_table is not None for block in stack)
    assert all(block.cross_attn.rel_bias_table is None for block in model.decoder)
    names = [n for n in model.hook_dict if n.endswith("rel_pos_hook")]
    assert names == [f"encoder.{l}.attn.rel_pos_hook" for l in range(3)] + [
        f"decoder.{l}.attn.rel_pos_hook" for l in range(2)
    ]
    # the tables really differ per layer (not layer 0's shared)
    assert not torch.equal(model.encoder[0].attn.rel_bias_table, model.encoder[1].attn.rel_bias_table)


@pytest.mark.parametrize("dec_len,pad_decoder", [(7, False), (1, False), (9, True)])
def test_parity_with_transformers(dec_len, pad_decoder):
    hf = hf_umt5()
    model = hooked(hf)
    cfg = model.cfg
    tokens, mask, dec, dec_mask = random_batch(cfg.d_vocab, 3, 13, dec_len, pad_decoder=pad_decoder)
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
    enc_names = (
        ["hook_embed"] + [f"encoder.{l}.hook_resid_post" for l in range(cfg.n_layers - 1)] + ["hook_encoder_out"]
    )
    assert len(ref.encoder_hidden_states) == len(enc_names)
    for name, hidden in zip(enc_names, ref.encoder_hidden_states):
        torch.testing.assert_close(cache[name], hidden, atol=ATOL, rtol=0, msg=name)
    dec_names = ["hook_decoder_embed"] + [f"decoder.{l}.hook_resid_post" for l in range(cfg.n_decoder_layers - 1)]
    for name, hidden in zip(dec_names, ref.decoder_hidden_states[:-1]):
        torch.testing.assert_close(cache[name], hidden, atol=ATOL, rtol=0, msg=name)
    torch.testing.assert_close(cache["unembed.hook_in"], ref.decoder_hidden_states[-1], atol=ATOL, rtol=0)
    for l in range(cfg.n_layers):
        torch.testing.assert_close(
            cache[f"encoder.{l}.attn.hook_pattern"], ref.encoder_attentions[l], atol=ATOL, rtol=0
        )
    for l in range(cfg.n_decoder_layers):
        torch.testing.assert_close(
            cache[f"decoder.{l}.attn.hook_pattern"], ref.decoder_attentions[l], atol=ATOL, rtol=0
        )
        torch.testing.assert_close(
            cache[f"decoder.{l}.cross_attn.hook_pattern"], ref.cross_attentions[l], atol=ATOL, rtol=0
        )
    # each layer's rel_pos_hook is that layer's own bias, as HF computes it
    for l, block in enumerate(hf.encoder.block):
        expected = block.layer[0].SelfAttention.compute_bias(13, 13)
        torch.testing.assert_close(cache[f"encoder.{l}.attn.rel_pos_hook"], expected, atol=0, rtol=0)


def test_loads_saved_checkpoint_and_tied_scaled_variant(tmp_path):
    hf = hf_umt5()
    hf.save_pretrained(tmp_path)
    model = HookedEncoderDecoder.from_pretrained(str(tmp_path))
    tokens, mask, dec, _ = random_batch(model.cfg.d_vocab, 2, 11, 5)
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens, dec, one_zero_attention_mask=mask),
            hf(input_ids=tokens, attention_mask=mask, decoder_input_ids=dec).logits,
            atol=ATOL,
            rtol=0,
        )
    # tied embeddings: logits scaled by d_model**-0.5 before the (shared) unembedding
    tied = hf_umt5(tie_word_embeddings=True)
    model = hooked(tied)
    assert model.cfg.scale_logits and model.unembed.lm_head is None
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens, dec, one_zero_attention_mask=mask),
            tied(input_ids=tokens, attention_mask=mask, decoder_input_ids=dec).logits,
            atol=ATOL,
            rtol=0,
        )


def test_patching_one_layers_bias_changes_only_from_that_layer():
    model = hooked(hf_umt5())
    tokens, mask, dec, _ = random_batch(model.cfg.d_vocab, 2, 9, 4)
    _, clean = model.run_with_cache(tokens, dec, one_zero_attention_mask=mask)
    zero = lambda t, hook: torch.zeros_like(t)
    with model.hooks(fwd_hooks=[("encoder.1.attn.rel_pos_hook", zero)]):
        _, patched = model.run_with_cache(tokens, dec, one_zero_attention_mask=mask)
    torch.testing.assert_close(patched["encoder.0.hook_resid_post"], clean["encoder.0.hook_resid_post"])
    assert not torch.allclose(patched["encoder.1.hook_resid_post"], clean["encoder.1.hook_resid_post"])


def test_capture_patch_of_a_layer_bias_matches_hook():
    model = hooked(hf_umt5())
    tokens, mask, dec, _ = random_batch(model.cfg.d_vocab, 2, 9, 4)
    name = "decoder.1.attn.rel_pos_hook"
    cap = model.capture([name, "encoder.2.attn.rel_pos_hook"], patch=[name])
    bias = torch.randn(1, model.cfg.n_heads, 4, 4)
    out = cap(tokens, dec, mask, patches={name: bias})
    with model.hooks(fwd_hooks=[(name, lambda t, hook: bias)]):
        ref = model(tokens, dec, one_zero_attention_mask=mask)
    torch.testing.assert_close(out["logits"], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[name], bias)
    assert out["encoder.2.attn.rel_pos_hook"].shape == (1, model.cfg.n_heads, 9, 9)


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or the Triton interpreter",
)
def test_fused_kernels_per_layer_match_eager(monkeypatch):
    hf = hf_umt5()
    eager = hooked(hf, attn_impl="eager")
    fused = hooked(hf, attn_impl="fused")
    import t5hooks.kernels as kernels

    tables = []
    original = kernels.relbias_attention

    def counting(q, k, v, table=None, **kwargs):
        tables.append(None if table is None else table.data_ptr())
        return original(q, k, v, table, **kwargs)

    monkeypatch.setattr(kernels, "relbias_attention", counting)
    tokens, mask, dec, dec_mask = random_batch(eager.cfg.d_vocab, 2, 11, 6, pad_decoder=True)
    labels = dec.masked_fill(dec_mask == 0, -100)
    args = dict(one_zero_attention_mask=mask, decoder_attention_mask=dec_mask, labels=labels, return_type="both")
    logits_e, loss_e = eager(tokens, dec, **args)
    logits_f, loss_f = fused(tokens, dec, **args)
    # 3 encoder + 2 decoder self-attention layers each with its own table, 2 cross-attentions without
    own = [b.attn.rel_bias_table.data_ptr() for b in [*fused.encoder, *fused.decoder]]
    assert tables == own[:3] + [own[3], None, own[4], None]
    torch.testing.assert_close(logits_f, logits_e, atol=1e-4, rtol=0)
    loss_e.backward()
    loss_f.backward()
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-3, msg=name)
    # a hook on one layer's bias materialises that layer only
    tables.clear()
    with fused.hooks(fwd_hooks=[("encoder.1.attn.rel_pos_hook", lambda t, hook: t * 0.5)]):
        out = fused(tokens, dec, one_zero_attention_mask=mask)
    with eager.hooks(fwd_hooks=[("encoder.1.attn.rel_pos_hook", lambda t, hook: t * 0.5)]):
        ref = eager(tokens, dec, one_zero_attention_mask=mask)
    assert len(tables) == 6
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_generate_matches_transformers():
    hf = hf_umt5()
    model = hooked(hf)
    tokens, mask, _, _ = random_batch(model.cfg.d_vocab, 2, 10, 1)
    out = model.generate(tokens, max_new_tokens=6, one_zero_attention_mask=mask, eos_token_id=None)
    with torch.no_grad():
        ref = hf.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(out[:, : ref.shape[1]], ref)


@pytest.mark.slow
def test_onnx_matches_eager(tmp_path):
    ort = pytest.importorskip("onnxruntime")  # noqa: F841
    from t5hooks.export import OnnxRunner, to_onnx

    model = hooked(hf_umt5())
    names = ["encoder.2.attn.rel_pos_hook", "decoder.1.hook_resid_post"]
    path = to_onnx(model, tmp_path / "umt5.onnx", capture=names)
    tokens, mask, dec, _ = random_batch(model.cfg.d_vocab, 2, 12, 5)
    out = OnnxRunner(path)(input=tokens, decoder_input=dec, one_zero_attention_mask=mask)
    ref = model.capture(names)(tokens, dec, mask)
    for key in ["logits", *names]:
        torch.testing.assert_close(torch.as_tensor(out[key]), ref[key].detach(), atol=1e-4, rtol=0, msg=key)


def test_random_init_has_a_table_per_layer():
    cfg = HookedT5Config(
        d_model=16, d_head=4, n_heads=2, d_mlp=24, n_layers=2, d_vocab=40, per_layer_position_bias=True, seed=0
    )
    model = HookedEncoderDecoder(cfg)
    assert model.decoder[1].attn.rel_bias_table is not None and model.decoder[1].attn.rel_bias_table.std() > 0
