"""The model with fused attention (the Triton kernels, under the interpreter on CPU) against the eager path."""

import os

import pytest
import torch
from t5_fixtures import random_batch

import t5hooks.kernels.op as op
from t5hooks import HookedEncoderDecoder, HookedT5Config

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or the Triton interpreter",
)


def pair():
    cfg = dict(
        d_model=32,
        d_head=16,
        n_heads=2,
        d_mlp=48,
        n_layers=2,
        n_decoder_layers=2,
        d_vocab=50,
        gated_mlp=True,
        act_fn="gelu_new",
        tie_word_embeddings=False,
        scale_logits=False,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
        seed=0,
    )
    eager = HookedEncoderDecoder(HookedT5Config(**cfg, attn_impl="eager"))
    fused = HookedEncoderDecoder(HookedT5Config(**cfg, attn_impl="fused"))
    fused.load_state_dict(eager.state_dict())
    return eager, fused


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count the fused-kernel launches (the custom op) per forward."""
    calls = []
    original = op.relbias_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    import t5hooks.kernels as kernels

    monkeypatch.setattr(kernels, "relbias_attention", counting)
    return calls


@pytest.mark.slow
def test_fused_forward_and_gradients_match_eager(kernel_calls):
    eager, fused = pair()
    tokens, mask, dec, dec_mask = random_batch(50, 2, 13, 7, pad_decoder=True)
    labels = dec.masked_fill(dec_mask == 0, -100)
    loss_e = eager(
        tokens, dec, one_zero_attention_mask=mask, decoder_attention_mask=dec_mask, labels=labels, return_type="loss"
    )
    loss_f = fused(
        tokens, dec, one_zero_attention_mask=mask, decoder_attention_mask=dec_mask, labels=labels, return_type="loss"
    )
    assert len(kernel_calls) == 2 + 2 * 2 and set(kernel_calls) == {"triton"}  # every attention fused
    torch.testing.assert_close(loss_f, loss_e, atol=1e-5, rtol=0)
    loss_e.backward()
    loss_f.backward()
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_only_hooked_layers_fall_back_to_materialised_attention(kernel_calls):
    eager, fused = pair()
    tokens, mask, dec, _ = random_batch(50, 2, 9, 5)
    ref = eager.capture(["decoder.1.attn.hook_pattern"])(tokens, dec, mask)
    out = fused.capture(["decoder.1.attn.hook_pattern"])(tokens, dec, mask)
    assert len(kernel_calls) == 5  # 6 attention layers, one materialised for its pattern
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], atol=1e-5, rtol=0)
    kernel_calls.clear()
    with torch.no_grad():
        patched = fused.run_with_hooks(
            tokens,
            dec,
            one_zero_attention_mask=mask,
            fwd_hooks=[("encoder.0.attn.rel_pos_hook", lambda b, hook: b * 0)],
        )
        expected = eager.run_with_hooks(
            tokens,
            dec,
            one_zero_attention_mask=mask,
            fwd_hooks=[("encoder.0.attn.rel_pos_hook", lambda b, hook: b * 0)],
        )
    assert len(kernel_calls) == 4  # the patched encoder bias forces both encoder layers to materialise
    torch.testing.assert_close(patched, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_fused_generation_with_kv_cache_matches_eager():
    eager, fused = pair()
    tokens, mask, _, _ = random_batch(50, 2, 9, 2)
    assert torch.equal(
        fused.generate(tokens, 6, one_zero_attention_mask=mask, stop_at_eos=False),
        eager.generate(tokens, 6, one_zero_attention_mask=mask, stop_at_eos=False),
    )


@pytest.mark.slow
def test_compiled_capture_runs_through_the_kernel_without_graph_breaks():
    torch._dynamo.reset()
    _, fused = pair()
    cap = fused.capture(["encoder.*.hook_resid_post", "decoder.*.hook_resid_post"])
    tokens, mask, dec, _ = random_batch(50, 2, 9, 5)
    explanation = torch._dynamo.explain(cap)(tokens, dec, mask)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    modules = [m for g in explanation.graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)]
    graph_ops = {str(node.target) for m in modules for node in m.graph.nodes}  # the graphs and their regions
    assert any("relbias_attention" in target for target in graph_ops)
