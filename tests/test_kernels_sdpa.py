"""`backend="sdpa"` (what fused layers run on CPU) against the float64 reference, and in the model against
materialised attention and Hugging Face T5."""

from __future__ import annotations

import pytest
import torch
from t5_fixtures import hf_t5, hooked_from, random_batch
from test_kernels import ALL_CASES, Case, assert_close_scaled, make_inputs, reference_float64

from t5hooks.kernels import policy, relbias_attention

CPU_CASES = {
    **ALL_CASES,
    "empty-rows": Case(padding="empty-row", causal=True, bidirectional=False, num_buckets=8, max_distance=12),
    "empty-rows-bidirectional": Case(padding="empty-row", q_len=9, k_len=13),
    "float64-kv-cache": Case(
        q_len=1, k_len=20, q_offset=19, dtype=torch.float64, causal=True, bidirectional=False, padding="right"
    ),
}
FWD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.float64: 1e-12}


def on_cpu(*tensors):
    return [None if t is None else t.cpu() for t in tensors]


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_sdpa_backend_matches_float64_reference(name):
    case = CPU_CASES[name]
    q, k, v, table, mask = on_cpu(*make_inputs(case))
    out = relbias_attention(q, k, v, table, key_padding_mask=mask, backend="sdpa", **case.options())
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    expected = reference_float64(case, q, k, v, table, mask)
    assert_close_scaled(out, expected, FWD_TOL[case.dtype], name)
    if mask is not None:  # rows that see no key are exactly zero, as in the reference
        no_key = expected.abs().amax(dim=(1, 3)) == 0  # [B,Q]
        assert (out.abs().amax(dim=(1, 3))[no_key] == 0).all()


def test_sdpa_tensor_q_offset_matches_int():
    case = CPU_CASES["decoder-kv-cache"]
    q, k, v, table, mask = on_cpu(*make_inputs(case))
    options = case.options()
    as_int = relbias_attention(q, k, v, table, key_padding_mask=mask, backend="sdpa", **options)
    options["q_offset"] = torch.tensor(case.q_offset)
    as_tensor = relbias_attention(q, k, v, table, key_padding_mask=mask, backend="sdpa", **options)
    torch.testing.assert_close(as_tensor, as_int, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["encoder-t5-buckets-padded", "decoder-kv-cache", "cross-attention", "empty-rows"])
def test_sdpa_gradients_match_float64_reference(name):
    case = CPU_CASES[name]
    inputs = on_cpu(*make_inputs(case))
    mask = inputs[4]
    leaves = [x.clone().requires_grad_() if x is not None else None for x in inputs[:4]]
    ref_leaves = [x.detach().double().requires_grad_() if x is not None else None for x in inputs[:4]]
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(3))
    out = relbias_attention(*leaves, key_padding_mask=mask, backend="sdpa", **case.options())
    (out * grad_out).sum().backward()
    expected = reference_float64(case, *ref_leaves, mask)
    (expected * grad_out.double()).sum().backward()
    for what, leaf, ref in zip("qkv", leaves[:3], ref_leaves[:3]):
        assert_close_scaled(leaf.grad, ref.grad, 1e-4, f"{name} d{what}")
    if leaves[3] is not None:
        assert_close_scaled(leaves[3].grad, ref_leaves[3].grad, 1e-4, f"{name} dtable")


def test_policy_picks_sdpa_for_fused_cpu_layers():
    cpu = torch.device("cpu")
    assert policy.fuses_by_default(cpu)
    assert policy.layer_backend(cpu, "auto") == "sdpa"
    assert policy.layer_backend(cpu, "fused") == ("triton" if policy.INTERPRETED else "sdpa")


def test_model_with_sdpa_attention_matches_materialised_and_hf():
    """attn_impl="auto" on CPU runs SDPA in every layer nobody hooks; logits, the captured residual stream
    and gradients agree with attn_impl="eager" and with Hugging Face (padded encoder, causal decoder)."""
    hf = hf_t5("t5_v1_1")
    tokens, mask, dec, _ = random_batch(hf.config.vocab_size, 3, 11, 6)
    sdpa, eager = hooked_from(hf, attn_impl="auto"), hooked_from(hf, attn_impl="eager")
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    names = ["encoder.*.hook_resid_post", "decoder.*.hook_resid_post"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
        got = sdpa.capture(names)(tokens, dec, mask)
    n_attention = sdpa.cfg.n_layers + 2 * sdpa.cfg.n_decoder_layers
    assert len(calls) == n_attention
    want = eager.capture(names)(tokens, dec, mask)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        hf_logits = hf(input_ids=tokens, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(got["logits"], hf_logits, rtol=1e-4, atol=1e-4)
    # a hooked pattern switches only that layer to materialised attention
    calls.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
        sdpa.capture(["encoder.0.attn.hook_pattern"])(tokens, dec, mask)
    assert len(calls) == n_attention - 1
    loss = sdpa(tokens, dec, one_zero_attention_mask=mask).logsumexp(-1).mean()
    loss.backward()
    eager(tokens, dec, one_zero_attention_mask=mask).logsumexp(-1).mean().backward()
    table_grad = sdpa.encoder[0].attn.rel_bias_table.grad
    torch.testing.assert_close(table_grad, eager.encoder[0].attn.rel_bias_table.grad, rtol=1e-4, atol=1e-5)
