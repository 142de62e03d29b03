"""Compiled Triton kernels on CUDA: bf16/fp16 parity at realistic sizes, the GPU tile sizes'
boundaries, dTable determinism, the decode path, export and compile. Skipped without CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_kernels import (
    EDGE_CONFIGS,
    Case,
    assert_close_scaled,
    make_inputs,
    reference_float64,
    score_gradient_per_bucket,
)

from t5hooks.kernels import op as kernel_op
from t5hooks.kernels import relbias_attention

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]

FWD_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}
GRAD_TOL = {torch.bfloat16: 6e-2, torch.float16: 1.5e-2, torch.float32: 1e-4}

CASES = {
    "encoder-L1000-bf16": Case(
        batch=2, heads=4, q_len=1000, k_len=1000, head_dim=64, dtype=torch.bfloat16, padding="right"
    ),
    "encoder-L777-d128-fp16": Case(batch=2, heads=4, q_len=777, k_len=777, head_dim=128, dtype=torch.float16),
    "decoder-L600-bf16": Case(
        batch=2, heads=4, q_len=600, k_len=600, head_dim=64, dtype=torch.bfloat16, causal=True, bidirectional=False
    ),  # fmt: skip
    "decoder-chunk-after-cache-fp16": Case(
        batch=2,
        heads=4,
        q_len=300,
        k_len=900,
        q_offset=600,
        head_dim=64,
        dtype=torch.float16,
        causal=True,
        bidirectional=False,
        padding="left",
    ),  # fmt: skip
    "cross-bf16": Case(
        batch=2, heads=4, q_len=333, k_len=1000, head_dim=64, dtype=torch.bfloat16, table=False, padding="ragged"
    ),
    "encoder-L2048-fp32": Case(batch=1, heads=2, q_len=2048, k_len=2048, head_dim=64, padding="right"),
}


def run_and_compare(case: Case, check_grads: bool = True, seed: int = 0) -> None:
    q, k, v, table, mask = make_inputs(case, seed=seed)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(q.device, q.dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v) + ((table,) if case.table else ())]
    out = relbias_attention(*leaves[:3], leaves[3] if case.table else None, key_padding_mask=mask, backend="triton",
                            **case.options())  # fmt: skip
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref = reference_float64(case, *ref_leaves[:3], ref_leaves[3] if case.table else None, mask)
    assert_close_scaled(out, ref, FWD_TOL[case.dtype], "out")
    if not check_grads:
        return
    out.backward(grad_out)
    ref.backward(grad_out.double())
    for what, leaf, ref_leaf in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        assert_close_scaled(leaf.grad, ref_leaf.grad, GRAD_TOL[case.dtype], what)
    if case.table:
        _, magnitude = score_gradient_per_bucket(case, q, k, v, table, mask, grad_out)
        err = (leaves[3].grad.double() - ref_leaves[3].grad).abs()
        assert (err <= GRAD_TOL[case.dtype] * magnitude + 1e-9).all(), (err / (magnitude + 1e-30)).max()


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_reference(name):
    run_and_compare(CASES[name])


@pytest.mark.parametrize("config", list(EDGE_CONFIGS))
def test_tile_classification_at_every_gpu_alignment(config):
    """16-bit GPU tiles are 128x64 (forward), 32x128 (dK/dV), 128x32 (dQ): every offset modulo 128.
    A wide table makes single entries matter even among hundreds of visible keys."""
    for q_offset in range(128, 256):
        case = Case(batch=1, heads=2, q_len=160, k_len=512, head_dim=64, q_offset=q_offset, dtype=torch.float16,
                    bias_std=3.0, **EDGE_CONFIGS[config])  # fmt: skip
        run_and_compare(case, seed=q_offset)


def test_table_gradient_is_bit_identical_across_runs():
    case = Case(batch=4, heads=8, q_len=1024, k_len=1024, head_dim=64, dtype=torch.bfloat16, padding="right")
    q, k, v, table, mask = make_inputs(case)
    grad_out = torch.randn_like(q)

    def grads():
        leaves = [x.clone().requires_grad_() for x in (q, k, v, table)]
        out = relbias_attention(*leaves, key_padding_mask=mask, backend="triton", **case.options())
        return torch.autograd.grad(out, leaves, grad_out)

    first = grads()
    for _ in range(3):
        for what, a, b in zip(("dq", "dk", "dv", "dtable"), first, grads()):
            assert torch.equal(a, b), what


@pytest.mark.parametrize("padding", [None, "right"])
def test_decode_step_against_long_cache(padding, monkeypatch):
    from t5hooks.kernels import triton_decode

    calls = []
    launch = triton_decode.launch_decode
    monkeypatch.setattr(triton_decode, "launch_decode", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    case = Case(batch=4, heads=8, q_len=1, k_len=4097, q_offset=4096, head_dim=64, dtype=torch.bfloat16, causal=True,
                bidirectional=False, padding=padding)  # fmt: skip
    run_and_compare(case)
    assert calls, "the decode kernel was not used"


def test_auto_backend_uses_kernels_on_cuda_and_reference_under_export():
    case = Case(batch=1, heads=2, q_len=40, k_len=40, head_dim=64, dtype=torch.bfloat16)
    q, k, v, table, _ = make_inputs(case)
    assert kernel_op.use_kernels("auto", q)

    class Attention(torch.nn.Module):
        def forward(self, q, k, v, table):
            return relbias_attention(q, k, v, table, **case.options())

    exported = torch.export.export(Attention(), (q, k, v, table))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert not any("t5hooks" in target for target in targets), targets
    expected = reference_float64(case, q, k, v, table, None)
    assert_close_scaled(exported.module()(q, k, v, table), expected, FWD_TOL[case.dtype], "exported")


def test_compile_fullgraph_on_cuda():
    case = Case(batch=2, heads=4, q_len=300, k_len=300, head_dim=64, dtype=torch.bfloat16, padding="right")
    q, k, v, table, mask = make_inputs(case)

    def loss(q, k, v, table):
        return (
            relbias_attention(q, k, v, table, key_padding_mask=mask, backend="triton", **case.options())
            .float()
            .square()
            .sum()
        )

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, table)]
    eager_leaves = [x.clone().requires_grad_() for x in (q, k, v, table)]
    for a, b in zip(
        torch.autograd.grad(compiled(*leaves), leaves), torch.autograd.grad(loss(*eager_leaves), eager_leaves)
    ):
        torch.testing.assert_close(a, b)
