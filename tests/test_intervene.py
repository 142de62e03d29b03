"""Interventions inside the capture graph: `model.capture(intervene={hook: module})` and its eager counterpart.

Checked against the plain forward (a zero-error SAE splice), Python hooks (eager = capture), the compiled graph
(features and gradients), torch.export and ONNX Runtime.
"""

import numpy as np
import pytest
import torch
import torch._dynamo
from t5_fixtures import random_batch
from torch import nn

from t5hooks import HookedEncoderDecoder, HookedT5Config
from t5hooks.export import OnnxRunner, to_exported_program, to_onnx
from t5hooks.interventions import SAE, LinearProbe, SteeringVector, TopKSAE

HOOK = "decoder.1.hook_resid_post"
ENC_HOOK = "encoder.0.hook_resid_post"


def tiny():
    cfg = HookedT5Config(
        d_model=16,
        d_head=4,
        n_heads=2,
        d_mlp=24,
        n_layers=2,
        n_decoder_layers=2,
        d_vocab=40,
        gated_mlp=True,
        act_fn="gelu_new",
        tie_word_embeddings=False,
        scale_logits=False,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        seed=0,
    )
    return HookedEncoderDecoder(cfg)


@pytest.fixture(scope="module")
def model():
    return tiny().requires_grad_(False)


def inputs(model, batch=2, enc=7, dec=5, seed=0):
    tokens, mask, dec_tokens, dec_mask = random_batch(model.cfg.d_vocab, batch, enc, dec, seed=seed, pad_decoder=True)
    return tokens, dec_tokens, mask, dec_mask


def sae(**kw):
    s = SAE(16, 32, seed=1, **kw)
    with torch.no_grad():
        s.b_enc.normal_(0, 0.1)
        s.b_dec.normal_(0, 0.1)
    return s


def test_zero_error_splice_leaves_logits_unchanged(model):
    args = inputs(model)
    spliced = model.capture([HOOK], intervene={HOOK: sae(use_error_term=True)})(*args)
    clean = model.capture([HOOK])(*args)
    torch.testing.assert_close(spliced["logits"], clean["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(spliced[HOOK], clean[HOOK], atol=1e-5, rtol=0)
    features = spliced[HOOK + ".features"]
    assert features.shape == (2, 5, 32) and (features >= 0).all() and (features > 0).any()


def test_output_names_order_and_replacement(model):
    args = inputs(model)
    s, probe = sae(), LinearProbe(16, 3)
    cap = model.capture(["decoder.0.hook_resid_post", HOOK], intervene={HOOK: s, ENC_HOOK: probe})
    out = cap(*args)
    assert list(out) == ["logits", "decoder.0.hook_resid_post", HOOK, ENC_HOOK + ".probe", HOOK + ".features"]
    # the captured name returns what the network sees downstream: the SAE's reconstruction
    torch.testing.assert_close(out[HOOK], s.decode(out[HOOK + ".features"]))
    clean = model.capture([HOOK])(*args)[HOOK]  # what the SAE reads
    torch.testing.assert_close(out[HOOK + ".features"], s.encode(clean))
    assert {n for n, _ in cap.named_parameters()} >= {"interventions.0.linear.weight", "interventions.1.W_enc"}


def test_eager_interventions_match_capture(model):
    args = inputs(model)
    tokens, dec, mask, dec_mask = args
    s, steer = sae(), SteeringVector(16, positions=[0, -1])
    with torch.no_grad():
        steer.vector.normal_()
    iv = {HOOK: s, "encoder.1.hook_mlp_out": steer}
    out = model.capture([], intervene=iv)(*args)
    logits = model.run_with_hooks(
        tokens, dec, one_zero_attention_mask=mask, decoder_attention_mask=dec_mask, interventions=iv
    )
    torch.testing.assert_close(out["logits"], logits, atol=1e-6, rtol=0)
    with model.hooks(interventions=iv):
        model(tokens, dec, one_zero_attention_mask=mask, decoder_attention_mask=dec_mask)
    torch.testing.assert_close(model.hook_dict[HOOK].ctx["features"], out[HOOK + ".features"], atol=1e-6, rtol=0)
    assert not model.hook_dict[HOOK].has_hooks()  # removed on exit
    with torch.no_grad():  # the steering only touched the first and last encoder positions
        clean = model.capture(["encoder.1.hook_mlp_out"])(*args)["encoder.1.hook_mlp_out"]
        steered = model.capture(["encoder.1.hook_mlp_out"], intervene={"encoder.1.hook_mlp_out": steer})(*args)
    diff = (steered["encoder.1.hook_mlp_out"] - clean).abs().amax(dim=(0, 2))
    assert diff[0] > 0 and diff[-1] > 0 and (diff[1:-1] == 0).all()


def test_intervention_errors(model):
    args = inputs(model)
    with pytest.raises(ValueError, match="did you mean"):
        model.capture([], intervene={"decoder.1.hook_resid_psot": sae()})
    with pytest.raises(ValueError, match="exact hook names"):
        model.capture([], intervene={"decoder.*.hook_resid_post": sae()})
    with pytest.raises(TypeError, match="nn.Module"):
        model.capture([], intervene={HOOK: lambda x: x})

    class Shrinks(nn.Module):
        def forward(self, x):
            return x[..., :4]

    class BadTuple(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(ValueError, match=r"keep the activation's shape \(2, 5, 16\)"):
        model.capture([], intervene={HOOK: Shrinks()})(*args)
    with pytest.raises(TypeError, match=r"Tensor or \(Tensor, dict\)"):
        model.capture([], intervene={HOOK: BadTuple()})(*args)


def encoder_of(model):
    """The HookedT5Encoder with `model`'s encoder weights."""
    from t5hooks import HookedT5Encoder

    encoder = HookedT5Encoder(model.cfg)
    encoder.load_state_dict({k: v for k, v in model.state_dict().items() if not HookedT5Encoder.discards(k)})
    return encoder.eval().requires_grad_(False)


def test_encoder_capture_interventions(model):
    """The encoder-only capture splices the same way: a HookedT5Encoder's, and the encoder-decoder's encoder
    stack alone (EncoderCaptureModule), equal the full capture's encoder activations and side outputs."""
    from t5hooks.capture import EncoderCaptureModule

    tokens, dec, mask, dec_mask = inputs(model)
    probe, steer = LinearProbe(16, 3), SteeringVector(16)
    with torch.no_grad():
        steer.vector.normal_()
    iv = {"encoder.0.hook_mlp_out": steer, ENC_HOOK: probe}
    full = model.capture(["hook_encoder_out"], intervene=iv)(tokens, dec, mask, dec_mask)
    for cap in (encoder_of(model).capture(["hook_encoder_out"], intervene=iv),
                EncoderCaptureModule(model, ["hook_encoder_out"], intervene=iv)):  # fmt: skip
        out = cap(tokens, mask)
        assert list(out) == ["last_hidden_state", "hook_encoder_out", ENC_HOOK + ".probe"]
        torch.testing.assert_close(out["hook_encoder_out"], full["hook_encoder_out"], atol=1e-6, rtol=0)
        torch.testing.assert_close(out[ENC_HOOK + ".probe"], full[ENC_HOOK + ".probe"], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="computed by the decoder"):
        EncoderCaptureModule(model, [], intervene={HOOK: sae()})


@pytest.mark.slow
def test_encoder_onnx_with_interventions_matches_eager(model, tmp_path):
    encoder = encoder_of(model)
    iv = {ENC_HOOK: sae()}
    cap = encoder.capture(["hook_embed"], intervene=iv).eval()
    tokens, _, mask, _ = inputs(model, batch=3, enc=9, seed=4)
    with torch.no_grad():
        ref = cap(tokens, mask)
    runner = OnnxRunner(to_onnx(encoder, tmp_path / "enc.onnx", capture=["hook_embed"], intervene=iv))
    assert runner.output_names == list(ref) == ["last_hidden_state", "hook_embed", ENC_HOOK + ".features"]
    got = runner(input=tokens.numpy(), one_zero_attention_mask=mask.numpy())
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name].numpy(), atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.slow
def test_compiled_equals_eager_features_and_gradients():
    """fullgraph, 0 graph breaks; base model frozen: gradients reach only the spliced modules' parameters."""
    torch._dynamo.reset()
    model = tiny().requires_grad_(False)
    args = inputs(model)
    eager_iv = {HOOK: TopKSAE(16, 32, k=4, seed=2), ENC_HOOK: LinearProbe(16, 3)}
    compiled_iv = {HOOK: TopKSAE(16, 32, k=4, seed=2), ENC_HOOK: LinearProbe(16, 3)}
    compiled_iv[ENC_HOOK].load_state_dict(eager_iv[ENC_HOOK].state_dict())
    eager = model.capture([], intervene=eager_iv)
    cap = model.capture([], intervene=compiled_iv)
    explanation = torch._dynamo.explain(cap)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    compiled = torch.compile(cap, fullgraph=True, backend="aot_eager")

    def step(c):
        out = c(*args, labels=args[1])
        loss = out["loss"] + out[HOOK + ".features"].abs().mean() + out[ENC_HOOK + ".probe"].square().mean()
        loss.backward()
        return out

    ref, got = step(eager), step(compiled)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=0)
    for (name, p), q in zip(eager.interventions.named_parameters(), cap.interventions.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_torch_export_and_onnx_match_eager(model, tmp_path):
    s, probe = sae(), LinearProbe(16, 3)
    iv = {HOOK: s, ENC_HOOK: probe}
    cap = model.capture(["decoder.0.hook_resid_post"], intervene=iv).eval()
    tokens, dec, mask, dec_mask = inputs(model, batch=3, enc=9, dec=4, seed=3)
    with torch.no_grad():
        ref = cap(tokens, dec, mask, dec_mask)
        program = to_exported_program(model, ["decoder.0.hook_resid_post"], intervene=iv)
        exported = program.module()(tokens, dec, mask, dec_mask, {})
    assert list(exported) == list(ref)
    for name in ref:
        torch.testing.assert_close(exported[name], ref[name], atol=1e-5, rtol=0)
    path = to_onnx(model, tmp_path / "sae.onnx", capture=["decoder.0.hook_resid_post"], intervene=iv)
    runner = OnnxRunner(path)
    assert runner.output_names == list(ref)
    got = runner(
        input=tokens.numpy(),
        decoder_input=dec.numpy(),
        one_zero_attention_mask=mask.numpy(),
        decoder_attention_mask=dec_mask.numpy(),
    )
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name].numpy(), atol=1e-4, rtol=0, err_msg=name)
