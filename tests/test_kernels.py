"""Fused relative-bias attention kernels against the plain-PyTorch reference.

Without CUDA the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), with
16x16 tiles, so these small odd-length shapes still cover several tiles near and far from the
diagonal. The interpreter's bf16 arithmetic is wrong, so only fp32 and fp16 are checked here
(bf16 is in test_kernels_gpu.py). With CUDA the same tests run the compiled kernels.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t5hooks.kernels import reference_relbias_attention, relative_position_bucket, relbias_attention
from t5hooks.kernels.reference import (
    allowed_keys,
    bias_and_mask,
    masked_softmax,
    position_bias,
    position_buckets,
    rows_with_keys,
)

HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int = 2
    heads: int = 2
    q_len: int = 37
    k_len: int = 37
    head_dim: int = 32
    dtype: torch.dtype = torch.float32
    table: bool = True
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    causal: bool = False
    padding: str | None = None  # "right", "left", "ragged" or "empty-row" (last batch row sees no key)
    q_offset: int = 0
    scale: float = 1.0
    strided: bool = False  # q, k, v as [B,L,H,d] buffers transposed to [B,H,L,d]
    bias_std: float = 1.0  # spread of the table entries

    def options(self) -> dict:
        return dict(
            bidirectional=self.bidirectional, num_buckets=self.num_buckets, max_distance=self.max_distance,
            causal=self.causal, q_offset=self.q_offset, scale=self.scale,
        )  # fmt: skip


def make_inputs(case: Case, seed: int = 0):
    """q, k, v, table, key_padding_mask on DEVICE in case.dtype (table fp32, mask bool)."""
    gen = torch.Generator().manual_seed(seed)

    def sequence(length: int, std: float = 1.0) -> torch.Tensor:
        if case.strided:  # a [B,L,H,d] projection output viewed as [B,H,L,d]
            x = torch.randn(case.batch, length, case.heads, case.head_dim, generator=gen).transpose(1, 2)
        else:
            x = torch.randn(case.batch, case.heads, length, case.head_dim, generator=gen)
        return (x * std).to(DEVICE, case.dtype)

    # q.k ~ N(0, 1), the scale of the bias: with larger scores the softmax is nearly one-hot and
    # a wrong bias on a few entries would hardly change the output
    qk_std = case.head_dim**-0.25
    q, k, v = sequence(case.q_len, qk_std), sequence(case.k_len, qk_std), sequence(case.k_len)
    table = (
        (torch.randn(case.num_buckets, case.heads, generator=gen) * case.bias_std).to(DEVICE) if case.table else None
    )
    mask = None
    if case.padding is not None:
        mask = torch.ones(case.batch, case.k_len, dtype=torch.bool)
        if case.padding == "right":
            mask[0, case.k_len * 2 // 3 :] = False
        elif case.padding == "left":  # first visible key: the last of a 16-key tile
            mask[-1, : min(15, case.k_len - 1)] = False
        elif case.padding == "ragged":
            mask = torch.rand(case.batch, case.k_len, generator=gen) > 0.3
        elif case.padding == "empty-row":
            mask[0, 5:] = False
            mask[-1] = False
        mask = mask.to(DEVICE)
    return q, k, v, table, mask


def reference_float64(case: Case, q, k, v, table, mask):
    return reference_relbias_attention(
        q.double(), k.double(), v.double(), None if table is None else table.double(),
        bidirectional=case.bidirectional, max_distance=case.max_distance, causal=case.causal,
        key_padding_mask=mask, q_offset=case.q_offset, scale=case.scale,
    )  # fmt: skip


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """max |actual - expected| <= tol * max |expected| (errors judged against the tensor's scale)."""
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * max(scale, 1e-6), f"{what}: max error {err:.3e} vs scale {scale:.3e} (tol {tol})"


FWD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 2e-2}

CASES = {
    # T5 bucketing squeezed (8 buckets, max distance 8) so that 16x16 tiles are far on both sides
    "encoder-far-tiles": Case(q_len=45, k_len=45, num_buckets=8, max_distance=8),
    "encoder-t5-buckets-padded": Case(padding="right"),
    "decoder-causal": Case(
        q_len=41, k_len=41, head_dim=16, bidirectional=False, causal=True, num_buckets=8, max_distance=12
    ),
    "decoder-kv-cache": Case(
        q_len=19,
        k_len=50,
        q_offset=31,
        bidirectional=False,
        causal=True,
        num_buckets=8,
        max_distance=16,
        padding="left",
    ),  # fmt: skip
    "cross-attention": Case(q_len=23, k_len=41, table=False, padding="ragged"),
    "causal-no-table": Case(q_len=35, k_len=35, table=False, causal=True, q_offset=0),
    "unidirectional-not-causal": Case(
        q_len=29, k_len=35, bidirectional=False, num_buckets=16, max_distance=20, q_offset=3
    ),
    "strided-scaled-d64": Case(
        q_len=33, k_len=27, head_dim=64, strided=True, scale=0.125, num_buckets=16, max_distance=24
    ),
    "head-dim-24": Case(
        batch=1, q_len=30, k_len=30, head_dim=24, num_buckets=8, max_distance=10, causal=True, bidirectional=False
    ),
    "fp16-padded": Case(
        q_len=33, k_len=47, head_dim=64, dtype=torch.float16, num_buckets=16, max_distance=16, padding="right"
    ),
    "fp16-causal": Case(
        q_len=40, k_len=40, dtype=torch.float16, causal=True, bidirectional=False, num_buckets=8, max_distance=10
    ),
}


def random_case(seed: int) -> Case:
    """Odd lengths, any flags; Q <= 4 sometimes (the decode kernel)."""
    rng = random.Random(seed)
    bidirectional = rng.random() < 0.5
    num_buckets = rng.choice([8, 16, 32])
    q_len = rng.choice([rng.randint(1, 4), rng.randint(5, 79)])
    return Case(
        batch=rng.randint(1, 2), heads=rng.randint(1, 2), q_len=q_len, k_len=rng.randint(1, 79),
        head_dim=rng.choice([16, 32, 64]), dtype=rng.choice([torch.float32, torch.float16]),
        table=rng.random() < 0.8, num_buckets=num_buckets,
        max_distance=rng.randint(num_buckets // 2 + 1, 3 * num_buckets), bidirectional=bidirectional,
        causal=not bidirectional and rng.random() < 0.8, padding=rng.choice([None, "right", "ragged"]),
        q_offset=rng.randint(0, 40),
    )  # fmt: skip


ALL_CASES = CASES | {f"random-{seed}": random_case(seed) for seed in range(6)}  # 4, 5: Q <= 4 (decode kernel)


@pytest.mark.parametrize(
    "num_buckets,max_distance,bidirectional",
    [(32, 128, True), (32, 128, False), (8, 8, True), (6, 5, False), (16, 40, True)],
)
def test_distance_clamp_is_exact(num_buckets, max_distance, bidirectional):
    """The kernels' premise: bucket(r) == bucket(clamp(r, -max_distance, max_distance)) for every r."""
    r = torch.arange(-5 * max_distance, 5 * max_distance + 1)
    opts = dict(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    clamped = r.clamp(-max_distance, max_distance)
    assert torch.equal(relative_position_bucket(r, **opts), relative_position_bucket(clamped, **opts))


@needs_triton
@pytest.mark.parametrize("name", list(ALL_CASES))
def test_forward_matches_reference(name):
    case = ALL_CASES[name]
    q, k, v, table, mask = make_inputs(case)
    out = relbias_attention(q, k, v, table, key_padding_mask=mask, backend="triton", **case.options())
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    assert_close_scaled(out, reference_float64(case, q, k, v, table, mask), FWD_TOL[case.dtype], name)


@needs_triton
def test_rows_without_visible_keys_are_zero():
    case = Case(padding="empty-row", causal=True, bidirectional=False, q_offset=0, num_buckets=8, max_distance=12)
    q, k, v, table, mask = make_inputs(case)  # batch row 0 sees keys 0..4 only, row B-1 none
    leaves = [x.clone().requires_grad_() for x in (q, k, v, table)]
    out = relbias_attention(*leaves, key_padding_mask=mask, backend="triton", **case.options())
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
    out.square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    assert torch.equal(leaves[0].grad[-1], torch.zeros_like(leaves[0].grad[-1]))  # no key, no gradient
    assert_close_scaled(out, reference_float64(case, q, k, v, table, mask), FWD_TOL[case.dtype], "empty rows")


def score_gradient_per_bucket(case: Case, q, k, v, table, mask, grad_out):
    """Float64 reference dS summed per (bucket, head), signed and in magnitude: two `[NB, H]` tensors.

    The table gradient is the signed sum, whose terms nearly cancel with random inputs; its error
    is judged against the sum of magnitudes."""
    q, k, v, table, grad_out = (x.double() for x in (q, k, v, table, grad_out))
    bias = position_bias(
        table, case.q_len, case.k_len, bidirectional=case.bidirectional, max_distance=case.max_distance,
        q_offset=case.q_offset,
    ).expand(case.batch, -1, -1, -1).clone().requires_grad_()  # fmt: skip
    allowed = allowed_keys(mask, case.q_len, case.k_len, causal=case.causal, q_offset=case.q_offset, device=q.device)
    scores = torch.matmul(q, k.transpose(-1, -2)) * case.scale + bias_and_mask(bias, allowed, torch.float64)
    torch.matmul(masked_softmax(scores, rows_with_keys(allowed)), v).backward(grad_out)
    d_scores = bias.grad  # [B,H,Q,K]
    buckets = position_buckets(
        case.q_len, case.k_len, bidirectional=case.bidirectional, num_buckets=case.num_buckets,
        max_distance=case.max_distance, q_offset=case.q_offset, device=q.device,
    ).flatten()  # fmt: skip

    def per_bucket(x):  # [B,H,Q,K] -> [NB,H]
        per_pair = x.sum(0).permute(1, 2, 0).reshape(-1, case.heads)  # [Q*K,H]
        return torch.zeros(case.num_buckets, case.heads, dtype=x.dtype, device=x.device).index_add_(
            0, buckets, per_pair
        )

    return per_bucket(d_scores), per_bucket(d_scores.abs())


GRAD_CASES = ["encoder-far-tiles", "encoder-t5-buckets-padded", "decoder-kv-cache", "cross-attention",
              "strided-scaled-d64", "fp16-causal", "random-1", "random-2"]  # fmt: skip


@needs_triton
@pytest.mark.parametrize("name", GRAD_CASES)
def test_gradients_match_float64_reference(name):
    case = ALL_CASES[name]
    q, k, v, table, mask = make_inputs(case)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, case.dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v) + ((table,) if case.table else ())]
    out = relbias_attention(*leaves[:3], leaves[3] if case.table else None, key_padding_mask=mask, backend="triton",
                            **case.options())  # fmt: skip
    out.backward(grad_out)

    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref = reference_float64(case, *ref_leaves[:3], ref_leaves[3] if case.table else None, mask)
    ref.backward(grad_out.double())
    tol = GRAD_TOL[case.dtype]
    for what, leaf, ref_leaf in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        assert leaf.grad.dtype == leaf.dtype
        assert_close_scaled(leaf.grad, ref_leaf.grad, tol, f"{name} {what}")
    if case.table:
        signed, magnitude = score_gradient_per_bucket(case, q, k, v, table, mask, grad_out)
        assert torch.allclose(signed, ref_leaves[3].grad, rtol=1e-9, atol=1e-9 * magnitude.max().item())
        err = (leaves[3].grad.double() - ref_leaves[3].grad).abs()
        assert (err <= tol * magnitude + 1e-12).all(), (
            f"{name} dtable: worst error/magnitude {(err / (magnitude + 1e-30)).max().item():.2e} (tol {tol})"
        )


# Bucket configurations whose last bucket starts exactly at max_distance: bucket(4) != bucket(5),
# so treating a tile one position too early as "far" changes the result.
EDGE_CONFIGS = {
    "bidirectional": dict(bidirectional=True, num_buckets=12, max_distance=5, causal=False),
    "causal": dict(bidirectional=False, num_buckets=6, max_distance=5, causal=True),
}


@pytest.mark.slow
@needs_triton
@pytest.mark.skipif(DEVICE != "cpu", reason="alignments enumerated for the interpreter's 16x16 tiles")
@pytest.mark.parametrize("config", list(EDGE_CONFIGS))
def test_tile_classification_at_every_alignment(config):
    """Which tiles count as near/far (and which query blocks a causal key block skips) depends on
    the query offset modulo the tile size: check all 16 alignments, forward and backward."""
    for q_offset in range(16, 32):  # one query tile; key tiles far behind it, near it, and far ahead
        case = Case(batch=1, heads=1, q_len=16, k_len=64, head_dim=16, q_offset=q_offset, **EDGE_CONFIGS[config])
        q, k, v, table, mask = make_inputs(case, seed=q_offset)
        leaves = [x.clone().requires_grad_() for x in (q, k, v, table)]
        out = relbias_attention(*leaves, backend="triton", **case.options())
        ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
        ref = reference_float64(case, *ref_leaves, mask)
        assert_close_scaled(out, ref, FWD_TOL[case.dtype], f"q_offset={q_offset} out")
        out.sum().backward()
        ref.sum().backward()
        for what, leaf, ref_leaf in zip(("dq", "dk", "dv", "dtable"), leaves, ref_leaves):
            assert_close_scaled(leaf.grad, ref_leaf.grad, GRAD_TOL[case.dtype], f"q_offset={q_offset} {what}")


@pytest.mark.slow
@needs_triton
def test_table_gradient_is_bit_identical_across_runs():
    case = Case(batch=2, q_len=47, k_len=47, num_buckets=16, max_distance=20, padding="right")
    q, k, v, table, mask = make_inputs(case)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, case.dtype)

    def grads():
        leaves = [x.clone().requires_grad_() for x in (q, k, v, table)]
        out = relbias_attention(*leaves, key_padding_mask=mask, backend="triton", **case.options())
        return torch.autograd.grad(out, leaves, grad_out)

    first, second = grads(), grads()
    for what, a, b in zip(("dq", "dk", "dv", "dtable"), first, second):
        assert torch.equal(a, b), what


@needs_triton
@pytest.mark.parametrize("q_len", [1, 3])
def test_decode_path_matches_reference(q_len, monkeypatch):
    from t5hooks.kernels import triton_decode

    case = Case(batch=2, q_len=q_len, k_len=70, q_offset=70 - q_len, causal=True, bidirectional=False,
                num_buckets=32, max_distance=32, padding="left")  # fmt: skip
    calls = []
    launch = triton_decode.launch_decode
    monkeypatch.setattr(triton_decode, "launch_decode", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    if DEVICE == "cpu":  # the cache is cut into several chunks, so the combine step is exercised
        cfg = triton_decode.decode_config(case.head_dim, interpreted=True)
        rows = case.batch * case.heads * q_len
        assert triton_decode.num_splits(rows, case.k_len, cfg["BLOCK_N"], cfg["programs_target"])[0] > 1

    q, k, v, table, mask = make_inputs(case)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, table)]
    out = relbias_attention(*leaves, key_padding_mask=mask, backend="triton", **case.options())
    assert calls, "the decode kernel was not used"
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref = reference_float64(case, *ref_leaves, mask)
    assert_close_scaled(out, ref, FWD_TOL[case.dtype], "decode out")
    out.sum().backward()
    ref.sum().backward()
    for what, leaf, ref_leaf in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        assert_close_scaled(leaf.grad, ref_leaf.grad, GRAD_TOL[case.dtype], f"decode {what}")


@pytest.mark.slow
@needs_triton
def test_custom_op_under_torch_compile_fullgraph():
    case = Case(q_len=21, k_len=33, head_dim=16, num_buckets=8, max_distance=16, causal=True, bidirectional=False,
                q_offset=12, padding="right")  # fmt: skip
    q, k, v, table, mask = make_inputs(case)

    def loss(q, k, v, table):
        return (
            relbias_attention(q, k, v, table, key_padding_mask=mask, backend="triton", **case.options()).square().sum()
        )

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)  # fullgraph: any graph break is an error
    leaves = [x.clone().requires_grad_() for x in (q, k, v, table)]
    eager_leaves = [x.clone().requires_grad_() for x in (q, k, v, table)]
    compiled_grads = torch.autograd.grad(compiled(*leaves), leaves)
    eager_grads = torch.autograd.grad(loss(*eager_leaves), eager_leaves)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_op_is_registered_with_fake_impl():
    q = torch.empty(2, 3, 5, 16, device="meta")
    k = torch.empty(2, 3, 7, 16, device="meta")
    out, lse = torch.ops.t5hooks.relbias_attention(q, k, k, torch.empty(8, 3, device="meta"), None,
                                                   True, 8, 16, False, 0, 1.0)  # fmt: skip
    assert out.shape == (2, 3, 5, 16) and lse.shape == (2, 3, 5) and lse.dtype == torch.float32
    grads = torch.ops.t5hooks.relbias_attention_backward(out, q, k, k, torch.empty(8, 3, device="meta"), None, out, lse,
                                                         True, 8, 16, False, 0, 1.0)  # fmt: skip
    assert [tuple(g.shape) for g in grads] == [(2, 3, 5, 16), (2, 3, 7, 16), (2, 3, 7, 16), (8, 3)]


def test_reference_backend_and_auto_on_cpu_match_reference():
    case = Case(q_len=9, k_len=11, num_buckets=8, max_distance=16, padding="right")
    q, k, v, table, mask = make_inputs(case)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    table, mask = table.cpu(), mask.cpu()
    expected = reference_float64(case, q, k, v, table, mask).float()
    for backend in ("reference", "auto"):  # auto on CPU tensors: the reference
        out = relbias_attention(q, k, v, table, key_padding_mask=mask, backend=backend, **case.options())
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _bad(**changes):
    """Arguments that are valid except for `changes` (meta tensors: nothing runs)."""
    args = dict(
        q=torch.empty(2, 4, 5, 16, device="meta"), k=torch.empty(2, 4, 7, 16, device="meta"),
        v=torch.empty(2, 4, 7, 16, device="meta"), rel_bias_table=torch.empty(32, 4, device="meta"),
        key_padding_mask=torch.empty(2, 7, dtype=torch.bool, device="meta"),
    )  # fmt: skip
    args.update(changes)
    return args


BAD_ARGUMENTS = {
    "q rank": (_bad(q=torch.empty(4, 5, 16, device="meta")), "q must be a 4-D tensor"),
    "k/v shapes": (_bad(v=torch.empty(2, 4, 6, 16, device="meta")), "k and v must have the same shape"),
    "batch": (_bad(q=torch.empty(3, 4, 5, 16, device="meta")), "batch size"),
    "heads": (_bad(q=torch.empty(2, 3, 5, 16, device="meta")), "number of heads"),
    "head dim": (_bad(q=torch.empty(2, 4, 5, 8, device="meta")), "head dim"),
    "dtype": (_bad(q=torch.empty(2, 4, 5, 16, device="meta", dtype=torch.float16)), "share one floating dtype"),
    "integer dtype": (
        _bad(**{n: torch.empty(2, 4, 7, 16, dtype=torch.long, device="meta") for n in "qkv"}),
        "floating dtype",
    ),
    "device": (_bad(q=torch.empty(2, 4, 5, 16)), "one device"),
    "backend": (_bad(backend="cuda"), "backend must be one of 'auto', 'triton', 'sdpa', 'reference'"),
    "table heads": (
        _bad(rel_bias_table=torch.empty(32, 3, device="meta")),
        r"rel_bias_table must be \[num_buckets, H\] = \[32, 4\]",
    ),
    "table buckets": (_bad(num_buckets=16), r"rel_bias_table must be \[num_buckets, H\] = \[16, 4\]"),
    "table rank": (_bad(rel_bias_table=torch.empty(32, device="meta")), "rel_bias_table must be a"),
    "mask shape": (
        _bad(key_padding_mask=torch.empty(2, 5, device="meta")),
        r"key_padding_mask must be \[B, K\] = \[2, 7\]",
    ),
    "q_offset": (_bad(q_offset=-1), "q_offset must be an int >= 0"),
    "max_distance": (_bad(max_distance=8), "max_distance must be an int greater than the 8 exact distances"),
    "num_buckets": (_bad(num_buckets=3, rel_bias_table=None), "num_buckets must be an int >= 4"),
    "triton float64": (
        _bad(**{n: torch.empty(2, 4, 7, 16, dtype=torch.float64, device="meta") for n in "qkv"}, backend="triton"),
        "supports float16, bfloat16 and float32",
    ),  # fmt: skip
    "triton head dim": (
        _bad(**{n: torch.empty(2, 4, 7, 256, device="meta") for n in "qkv"}, backend="triton"),
        "head dims up to 128",
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_bad_arguments_raise_value_error(name):
    kwargs, message = BAD_ARGUMENTS[name]
    with pytest.raises(ValueError, match=message):
        relbias_attention(**kwargs)


def _python(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


@pytest.mark.slow
def test_import_is_lazy_and_works_without_triton():
    lazy = _python("import sys, t5hooks.kernels; assert 'triton' not in sys.modules, 'triton imported eagerly'")
    assert lazy.returncode == 0, lazy.stderr
    without = _python(
        "import sys; sys.modules['triton'] = None\n"  # as if triton were not installed
        "import torch, t5hooks.kernels as K\n"
        "x = torch.randn(1, 2, 5, 8)\n"
        "out = K.relbias_attention(x, x, x, torch.randn(32, 2))\n"  # auto -> reference
        "try:\n"
        "    K.relbias_attention(x, x, x, backend='triton')\n"
        "except RuntimeError as err:\n"
        "    print(err)\n"
    )
    assert without.returncode == 0, without.stderr
    assert "needs the triton package" in without.stdout


# Compiling for a GPU needs no GPU: triton ships ptxas. This catches what the interpreter lets
# through (types, layouts, unsupported ops) and shared-memory overuse, on CPU-only CI.
COMPILE_FOR_H100 = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from t5hooks.kernels import prep, triton_backward, triton_decode, triton_forward

launches = []
class Recorder:
    def __init__(self, kernel): self.kernel = kernel
    def __getitem__(self, grid): return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))
torch.library.wrap_triton = Recorder
torch.cuda.get_device_capability = lambda device=None: (9, 0)
torch.cuda.get_device_properties = lambda device=None: type("Props", (), {"multi_processor_count": 132})

B, H, L, d = 2, 16, 256, 64
q = torch.empty(B, H, L, d, dtype=torch.bfloat16)
table = torch.randn(32, H)
mask = torch.ones(B, L, dtype=torch.bool)
buckets = prep.bucket_by_distance(32, 128, bidirectional=True)
bias = prep.bias_by_distance(table, buckets)
common = dict(causal=True, q_offset=0, bound=128, scale=1.0, interpreted=False)
masks = (prep.key_mask_int8(mask), prep.key_ranges(mask))
triton_forward.launch_forward(q, q, q, bias, *masks, **common)
out, lse = q.clone(), torch.empty(B, H, L)
triton_backward.launch_backward(q, q, q, q, out, lse, bias, buckets, 32, *masks, **common)
triton_decode.launch_decode(q[:, :, :1], q, q, bias, *masks, **common)

TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32", torch.int8: "*i8"}
for kernel, args, kwargs in launches:
    names = kernel.arg_names
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages", "enable_fp_fusion") if key in kwargs}
    values = dict(zip(names, args)) | kwargs
    signature = {n: "constexpr" if kernel.params[i].is_constexpr
                 else TYPES[values[n].dtype] if isinstance(values[n], torch.Tensor)
                 else "fp32" if isinstance(values[n], float) else "i32" for i, n in enumerate(names)}
    constexprs = {n: values[n] for n in names if signature[n] == "constexpr"}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.metadata.shared <= 227 * 1024, (kernel.__name__, compiled.metadata.shared)
    print(kernel.__name__, "shared", compiled.metadata.shared)
"""


@pytest.mark.slow
@needs_triton
def test_kernels_compile_for_h100():
    result = _python(COMPILE_FOR_H100)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = {line.split()[0] for line in result.stdout.splitlines()}
    assert compiled == {"_forward_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel",
                        "_decode_split_kernel", "_decode_combine_kernel"}  # fmt: skip


@pytest.mark.slow
@needs_triton
def test_bench_quick_writes_json_and_png(tmp_path):
    from t5hooks.apps.bench import attention as bench

    argv = ["--quick", "--out", str(tmp_path), "--cases", "L40-padded", "decode-64",
            "--impls", "triton", "reference", "sdpa-no-bias"]  # fmt: skip
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "attention.json").read_text())
    assert report["environment"]["torch"] == torch.__version__
    rows = {(entry["case"]["name"], r["impl"], r["mode"]): r for entry in report["cases"] for r in entry["results"]}
    assert set(rows) == {("L40-padded", impl, mode) for impl in ("triton", "reference", "sdpa-no-bias")
                         for mode in ("fwd", "fwd+bwd")} | {("decode-64", impl, "fwd") for impl in ("triton", "reference", "sdpa-no-bias")}  # fmt: skip
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows.values()), rows
    assert rows[("L40-padded", "triton", "fwd")]["max_abs_err"] < 1e-3
    assert "gbps" in rows[("decode-64", "triton", "fwd")]
    assert (tmp_path / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_reports_failures_with_their_reason():
    from t5hooks.apps.bench import attention as bench

    def broken(case, mask):
        def run(q, k, v, table):
            raise RuntimeError("no kernel for this shape")

        return run

    case = bench.quick_cases()[0]
    builders = bench.BUILDERS | {"broken": broken}
    entry = bench.run_case(
        case, torch.device("cpu"), torch.float32, ["reference", "broken"], quick=True, builders=builders
    )
    by_impl = {(r["impl"], r["mode"]): r for r in entry["results"]}
    assert by_impl[("reference", "fwd")]["status"] == "ok"
    assert by_impl[("broken", "fwd")] == {"impl": "broken", "mode": "fwd", "status": "failed",
                                          "reason": "RuntimeError: no kernel for this shape"}  # fmt: skip
    assert by_impl[("broken", "fwd+bwd")]["status"] == "failed"
