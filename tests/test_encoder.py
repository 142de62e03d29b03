"""HookedT5Encoder: the encoder alone, against transformers' T5EncoderModel / MT5EncoderModel / UMT5EncoderModel.

Every hidden state and the last hidden state (fp32, atol 1e-4) on a padded batch, through both load routes
(a save_pretrained directory and a live `hf_model=`); a full encoder-decoder checkpoint; a diffusers-style
pipeline directory with `subfolder=`; hooks, cache, capture without graph breaks, ONNX Runtime parity.
"""

import json

import pytest
import torch
from t5_fixtures import ENCODER_CONFIGS, hf_encoder, hf_t5, random_batch

from t5hooks import HookedEncoderDecoder, HookedT5Encoder

ATOL = 1e-4


def hidden_names(n_layers):
    # HF hidden states: the embedding, the output of every block but the last, then the final-norm output.
    return ["hook_embed"] + [f"encoder.{l}.hook_resid_post" for l in range(n_layers - 1)] + ["hook_encoder_out"]


def check_parity(model, hf, batch=3, length=13):
    tokens, mask, _, _ = random_batch(model.cfg.d_vocab, batch, length, 1)
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
        out, cache = model.run_with_cache(tokens, mask)
    torch.testing.assert_close(out, ref.last_hidden_state, atol=ATOL, rtol=0)
    names = hidden_names(model.cfg.n_layers)
    assert len(ref.hidden_states) == len(names)
    for name, hidden in zip(names, ref.hidden_states):
        torch.testing.assert_close(cache[name], hidden, atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("family", list(ENCODER_CONFIGS))
def test_parity_directory_and_live_model(tmp_path, family):
    hf = hf_encoder(family)
    hf.save_pretrained(tmp_path)
    from_dir = HookedT5Encoder.from_pretrained(str(tmp_path))
    live = HookedT5Encoder.from_pretrained("live", hf_model=hf)
    assert from_dir.cfg.per_layer_position_bias == (family == "umt5")
    check_parity(from_dir, hf)
    check_parity(live, hf)
    assert live.encoder[0].attn.q_proj.data_ptr() == hf.encoder.block[0].layer[0].SelfAttention.q.weight.data_ptr()


def test_same_hook_names_and_values_as_the_encoder_decoders_encoder(tmp_path):
    hf = hf_t5("t5_v1_1")
    hf.save_pretrained(tmp_path)
    full = HookedEncoderDecoder.from_pretrained(str(tmp_path))
    enc = HookedT5Encoder.from_pretrained(str(tmp_path))  # keeps the encoder of a full checkpoint
    assert not any(n.startswith(("decoder", "unembed")) for n in enc.state_dict())
    encoder_half = [n for n in full.hook_dict if n.startswith(("hook_embed", "encoder", "hook_encoder_out"))]
    assert list(enc.hook_dict) == encoder_half
    tokens, mask, dec, _ = random_batch(full.cfg.d_vocab, 2, 9, 3)
    _, full_cache = full.run_with_cache(tokens, dec, one_zero_attention_mask=mask)
    out, cache = enc.run_with_cache(tokens, mask)
    for name in enc.hook_dict:
        torch.testing.assert_close(cache[name], full_cache[name], atol=0, rtol=0, msg=name)
    torch.testing.assert_close(
        out, hf.encoder(input_ids=tokens, attention_mask=mask).last_hidden_state, atol=ATOL, rtol=0
    )
    # analysis helpers for one stack
    resid, labels = cache.accumulated_resid(stack="encoder", return_labels=True)
    assert resid.shape[0] == enc.cfg.n_layers + 1 and len(labels) == enc.cfg.n_layers + 1
    assert enc.W_Q.shape == (enc.cfg.n_layers, enc.cfg.n_heads, enc.cfg.d_model, enc.cfg.d_head)
    assert len(enc.all_head_labels()) == enc.cfg.n_layers * enc.cfg.n_heads


def test_run_with_hooks_and_errors():
    hf = hf_encoder("t5")
    enc = HookedT5Encoder.from_pretrained("live", hf_model=hf)
    tokens, mask, _, _ = random_batch(enc.cfg.d_vocab, 2, 8, 1)
    zero_mlp = lambda t, hook: torch.zeros_like(t)
    out = enc.run_with_hooks(tokens, mask, fwd_hooks=[("encoder.*.hook_mlp_out", zero_mlp)])
    layers = hf.encoder.block
    with torch.no_grad():
        handles = [b.layer[1].DenseReluDense.register_forward_hook(lambda m, i, o: torch.zeros_like(o)) for b in layers]
        ref = hf(input_ids=tokens, attention_mask=mask).last_hidden_state
        for h in handles:
            h.remove()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="HookedEncoderDecoder"):
        enc.run_with_hooks(tokens, fwd_hooks=[("decoder.0.hook_resid_post", zero_mlp)])
    with pytest.raises(ValueError, match="return_type"):
        enc(tokens, return_type="logits")


def test_encoder_decoder_refuses_encoder_only_checkpoints(tmp_path):
    hf = hf_encoder("t5")
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="HookedT5Encoder"):
        HookedEncoderDecoder.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="HookedT5Encoder"):
        HookedEncoderDecoder.from_pretrained("live", hf_model=hf)


def test_diffusers_pipeline_directory(tmp_path):
    hf = hf_encoder("t5")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    hf.save_pretrained(tmp_path / "text_encoder_2")
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    with pytest.raises(FileNotFoundError, match=r"one of \[.text_encoder_2.\]"):
        HookedT5Encoder.from_pretrained(str(tmp_path))
    enc = HookedT5Encoder.from_pretrained(str(tmp_path), subfolder="text_encoder_2")
    check_parity(enc, hf)


@pytest.mark.slow
def test_capture_compiles_without_graph_breaks():
    enc = HookedT5Encoder.from_pretrained("live", hf_model=hf_encoder("umt5"))
    tokens, mask, _, _ = random_batch(enc.cfg.d_vocab, 2, 9, 1)
    names = ["encoder.*.hook_resid_post", "encoder.1.attn.hook_pattern"]
    cap = enc.capture(names, patch=["encoder.0.hook_mlp_out"], patch_mode="add")
    steer = torch.randn(enc.cfg.d_model)
    out = cap(tokens, mask, patches={"encoder.0.hook_mlp_out": steer})
    assert list(out)[:2] == ["last_hidden_state", "encoder.0.hook_resid_post"]
    with enc.hooks(fwd_hooks=[("encoder.0.hook_mlp_out", lambda t, hook: t + steer)]):
        ref, cache = enc.run_with_cache(tokens, mask)
    torch.testing.assert_close(out["last_hidden_state"], ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["encoder.1.attn.hook_pattern"], cache["encoder.1.attn.hook_pattern"])
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(cap)(tokens, mask, {"encoder.0.hook_mlp_out": steer})
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(cap, fullgraph=True, backend="aot_eager")
    compiled_out = compiled(tokens, mask, {"encoder.0.hook_mlp_out": steer})
    for name in out:
        torch.testing.assert_close(compiled_out[name], out[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
def test_onnx_encoder_graph_matches_eager(tmp_path):
    from t5hooks.export import OnnxRunner, to_onnx

    enc = HookedT5Encoder.from_pretrained("live", hf_model=hf_encoder("umt5"))
    names = ["encoder.1.hook_resid_post", "encoder.2.attn.rel_pos_hook"]
    patch = "encoder.0.hook_resid_mid"
    path = to_onnx(enc, tmp_path / "enc.onnx", capture=names, patch=[patch], patch_mode="add")
    runner = OnnxRunner(path)
    assert list(runner.inputs) == ["input", "one_zero_attention_mask", f"patch.{patch}"]
    assert runner.output_names == ["last_hidden_state", *names]
    tokens, mask, _, _ = random_batch(enc.cfg.d_vocab, 3, 11, 1)
    steer = torch.randn(1, 1, enc.cfg.d_model)
    got = runner(input=tokens, one_zero_attention_mask=mask, patches={patch: steer})
    ref = enc.capture(names, patch=[patch], patch_mode="add")(tokens, mask, patches={patch: steer})
    for name in runner.output_names:
        torch.testing.assert_close(torch.as_tensor(got[name]), ref[name].detach(), atol=1e-4, rtol=0, msg=name)
