"""Explicit-output capture: same values as Python hooks, patches, errors, and torch.compile with no graph breaks."""

import pytest
import torch
import torch._dynamo
from t5_fixtures import random_batch
from torch._dynamo.testing import CompileCounterWithBackend

from t5hooks import HookedEncoderDecoder, HookedT5Config


def tiny(**kw):
    cfg = HookedT5Config(
        d_model=16,
        d_head=4,
        n_heads=2,
        d_mlp=24,
        n_layers=2,
        n_decoder_layers=3,
        d_vocab=40,
        gated_mlp=True,
        act_fn="gelu_new",
        tie_word_embeddings=False,
        scale_logits=False,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        seed=0,
        **kw,
    )
    return HookedEncoderDecoder(cfg)


@pytest.fixture(scope="module")
def model():
    return tiny()


def inputs(model, batch=2, enc=7, dec=5, seed=0):
    tokens, mask, dec_tokens, dec_mask = random_batch(model.cfg.d_vocab, batch, enc, dec, seed=seed, pad_decoder=True)
    return tokens, dec_tokens, mask, dec_mask


RESID = ["encoder.*.hook_resid_post", "decoder.*.hook_resid_post"]


def test_capture_matches_run_with_cache_in_hook_order(model):
    tokens, dec, mask, dec_mask = inputs(model)
    cap = model.capture(RESID + ["*.hook_pattern", "hook_encoder_out", "decoder.0.attn.rel_pos_hook"])
    out = cap(tokens, dec, mask, dec_mask)
    logits, cache = model.run_with_cache(tokens, dec, one_zero_attention_mask=mask, decoder_attention_mask=dec_mask)
    names = list(out)
    assert names[0] == "logits"
    order = list(model.hook_dict)
    assert names[1:] == sorted(names[1:], key=order.index)  # the model's hook order
    assert "decoder.2.cross_attn.hook_pattern" in out
    torch.testing.assert_close(out["logits"], logits, atol=1e-6, rtol=0)
    for name in names[1:]:
        torch.testing.assert_close(out[name], cache[name], atol=1e-6, rtol=0)


def test_capture_shares_parameters(model):
    cap = model.capture(RESID)
    assert cap.model is model
    assert all(p is q for p, q in zip(cap.parameters(), model.parameters()))


def test_patches_replace_and_add_match_python_hooks(model):
    tokens, dec, mask, dec_mask = inputs(model)
    steer = torch.randn(16)
    replacement = torch.randn(2, 7, 16)
    cap = model.capture(
        ["decoder.1.hook_mlp_out", "decoder.2.hook_resid_post"],
        patch=["encoder.1.hook_resid_mid", "decoder.1.hook_mlp_out"],
        patch_mode={"encoder.1.hook_resid_mid": "replace", "decoder.*.hook_mlp_out": "add"},
    )
    out = cap(
        tokens, dec, mask, dec_mask, patches={"encoder.1.hook_resid_mid": replacement, "decoder.1.hook_mlp_out": steer}
    )
    hooks = [
        ("encoder.1.hook_resid_mid", lambda x, hook: replacement),
        ("decoder.1.hook_mlp_out", lambda x, hook: x + steer),
    ]
    with model.hooks(fwd_hooks=hooks):
        logits, cache = model.run_with_cache(
            tokens,
            dec,
            one_zero_attention_mask=mask,
            decoder_attention_mask=dec_mask,
            names_filter=["decoder.1.hook_mlp_out", "decoder.2.hook_resid_post"],
        )
    torch.testing.assert_close(out["logits"], logits, atol=1e-6, rtol=0)
    # a name both patched and captured returns the patched value
    torch.testing.assert_close(out["decoder.1.hook_mlp_out"], cache["decoder.1.hook_mlp_out"], atol=1e-6, rtol=0)
    unsteered = model.capture(["decoder.1.hook_mlp_out"], patch=["encoder.1.hook_resid_mid"])
    clean = unsteered(tokens, dec, mask, dec_mask, patches={"encoder.1.hook_resid_mid": replacement})
    torch.testing.assert_close(
        out["decoder.1.hook_mlp_out"], clean["decoder.1.hook_mlp_out"] + steer, atol=1e-6, rtol=0
    )


def test_labels_give_loss(model):
    tokens, dec, mask, _ = inputs(model)
    labels = dec.clone()
    labels[1, 3:] = -100
    out = model.capture(RESID)(tokens, one_zero_attention_mask=mask, labels=labels)
    assert list(out)[:2] == ["logits", "loss"]
    torch.testing.assert_close(
        out["loss"], model(tokens, one_zero_attention_mask=mask, labels=labels, return_type="loss")
    )


def test_capture_errors(model):
    tokens, dec, mask, dec_mask = inputs(model)
    with pytest.raises(ValueError, match="did you mean"):
        model.capture(["encoder.0.hook_resid_psot"])
    with pytest.raises(ValueError, match="use_attn_result"):
        model.capture(["encoder.0.attn.hook_result"])
    with pytest.raises(ValueError, match="patch_mode='swap'"):
        model.capture([], patch=["hook_embed"], patch_mode="swap")
    with pytest.raises(ValueError, match="no mode for"):
        model.capture([], patch=["hook_embed", "hook_encoder_out"], patch_mode={"hook_embed": "add"})
    cap = model.capture(RESID, patch=["hook_embed"])
    with pytest.raises(ValueError, match="missing patches"):
        cap(tokens, dec)
    with pytest.raises(ValueError, match="not in this module's patch set"):
        cap(tokens, dec, patches={"hook_embed": torch.zeros(2, 7, 16), "hook_encoder_out": torch.zeros(2, 7, 16)})
    with pytest.raises(ValueError, match=r"'replace' needs \(2, 7, 16\)"):
        cap(tokens, dec, patches={"hook_embed": torch.zeros(2, 6, 16)})
    add = model.capture([], patch=["hook_embed"], patch_mode="add")
    with pytest.raises(ValueError, match="broadcasts"):
        add(tokens, dec, patches={"hook_embed": torch.zeros(3)})


@pytest.mark.slow
@pytest.mark.parametrize(
    "names,patch,mode",
    [
        (RESID, (), "replace"),
        (["*.hook_pattern"], (), "replace"),
        (
            RESID + ["decoder.0.cross_attn.hook_pattern"],
            ["encoder.0.hook_resid_mid", "decoder.1.hook_mlp_out"],
            {"encoder.0.hook_resid_mid": "replace", "decoder.1.hook_mlp_out": "add"},
        ),
    ],
)
def test_no_graph_breaks(model, names, patch, mode):
    tokens, dec, mask, dec_mask = inputs(model)
    cap = model.capture(names, patch=patch, patch_mode=mode)
    patches = (
        {"encoder.0.hook_resid_mid": torch.randn(2, 7, 16), "decoder.1.hook_mlp_out": torch.randn(16)}
        if patch
        else None
    )
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(cap)(tokens, dec, mask, dec_mask, patches)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_training_step_matches_eager_and_compiles_once():
    """Loss = LM loss + L1 penalty on every residual stream; compiled (fullgraph, dynamic) gradients equal eager,
    and new batch/sequence lengths reuse the one dynamic graph."""
    torch._dynamo.reset()
    eager_model, compiled_model = tiny(), tiny()
    eager_cap = eager_model.capture(RESID)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model.capture(RESID), fullgraph=True, dynamic=True, backend=backend)

    def step(cap, tokens, dec, mask, dec_mask):
        out = cap(tokens, dec, mask, dec_mask, labels=dec)
        penalty = sum(out[n].abs().mean() for n in out if n.endswith("hook_resid_post"))
        loss = out["loss"] + 1e-2 * penalty
        loss.backward()
        return out, loss

    # sizes >= 2: PyTorch specialises dimensions of size 0 and 1, so a batch of one is a second graph
    for batch, enc, dec_len, seed in [(2, 7, 5, 0), (3, 11, 4, 1), (4, 6, 9, 2)]:
        args = inputs(eager_model, batch, enc, dec_len, seed)
        eager_model.zero_grad(), compiled_model.zero_grad()
        ref_out, ref_loss = step(eager_cap, *args)
        out, loss = step(compiled, *args)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
        for name in ref_out:
            torch.testing.assert_close(out[name], ref_out[name], atol=1e-5, rtol=0)
        for (name, p), q in zip(eager_model.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=0, msg=name)
    assert backend.frame_count == 1  # one dynamic graph for all three shapes


@pytest.mark.slow
def test_inductor_compiled_capture_matches_eager():
    torch._dynamo.reset()
    model = tiny()
    cap = model.capture(
        RESID + ["decoder.*.cross_attn.hook_pattern"], patch=["decoder.1.hook_mlp_out"], patch_mode="add"
    )
    compiled = torch.compile(cap, fullgraph=True)
    steer = torch.randn(16)
    args = inputs(model)
    with torch.no_grad():
        out = compiled(*args, patches={"decoder.1.hook_mlp_out": steer})
        ref = cap(*args, patches={"decoder.1.hook_mlp_out": steer})
    assert list(out) == list(ref)
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], atol=1e-5, rtol=0)
