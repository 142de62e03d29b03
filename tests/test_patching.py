"""Activation patching and attribution patching over residual streams, heads and cross-attention edges."""

import pytest
import torch
from t5_fixtures import hf_t5, hooked_from, random_batch

from t5hooks import HookedEncoderDecoder, HookedT5Config
from t5hooks.analysis.patching import RunInputs, patch_cross_attn_edges, patch_heads, patch_residual

RIGHT, WRONG = 10, 20


def logit_diff(logits):  # [batch, dec_pos, d_vocab] -> scalar
    return (logits[:, -1, RIGHT] - logits[:, -1, WRONG]).mean()


@pytest.fixture(scope="module")
def model():
    return hooked_from(hf_t5("t5_v1_1"))


@pytest.fixture(scope="module")
def prompts(model):
    """Clean and corrupted runs that differ in one encoder token (position 2) and in one decoder token (position 1)."""
    tokens, mask, dec, _ = random_batch(model.cfg.d_vocab, 2, 7, 4)
    enc_corrupt = tokens.clone()
    enc_corrupt[:, 2] = (enc_corrupt[:, 2] + 17) % (model.cfg.d_vocab - 3) + 3
    dec_corrupt = dec.clone()
    dec_corrupt[:, 1] = (dec_corrupt[:, 1] + 29) % (model.cfg.d_vocab - 3) + 3
    clean = RunInputs(tokens, dec, one_zero_attention_mask=mask)
    return clean, RunInputs(enc_corrupt, dec, mask), RunInputs(tokens, dec_corrupt, mask)


SWEEPS = [
    (patch_residual, dict(stack="encoder")),
    (patch_residual, dict(stack="decoder", site="resid_mid_cross")),
    (patch_heads, dict(stack="encoder")),
    (patch_heads, dict(attn="cross", per_position=True)),
    (patch_cross_attn_edges, dict()),
]


@pytest.mark.parametrize("sweep,options", SWEEPS)
def test_patching_a_run_with_itself_changes_nothing(model, prompts, sweep, options):
    clean = prompts[0]
    for method in ("activation", "attribution"):
        result = sweep(model, clean, clean, logit_diff, method=method, **options)
        # the two runs may take different attention paths (SDPA for unhooked layers, materialised scores where
        # gradients or patterns are read): equal up to float rounding, as the restored values below
        assert result.clean_metric == pytest.approx(result.corrupted_metric, rel=0, abs=1e-5)
        restored = torch.full_like(result.values, result.clean_metric)
        torch.testing.assert_close(result.values, restored, atol=1e-5, rtol=0)


def test_patching_a_whole_residual_layer_restores_the_clean_metric(model, prompts):
    clean, enc_corrupt, dec_corrupt = prompts
    result = patch_residual(model, clean, enc_corrupt, logit_diff, stack="encoder", per_position=False)
    assert abs(result.clean_metric - result.corrupted_metric) > 0.05  # the corruption matters
    assert result.col_labels == ["all"] and result.row_labels == ["L0", "L1", "L2"]
    torch.testing.assert_close(result.values, torch.full_like(result.values, result.clean_metric), atol=1e-5, rtol=0)
    torch.testing.assert_close(result.normalized(), torch.ones_like(result.values), atol=1e-4, rtol=0)
    # The decoder reads the encoder through cross-attention, so restoring its residual needs a decoder-side corruption.
    for site in ("resid_pre", "resid_post"):
        result = patch_residual(model, clean, dec_corrupt, logit_diff, site=site, per_position=False)
        assert abs(result.clean_metric - result.corrupted_metric) > 0.05
        restored = torch.full_like(result.values, result.clean_metric)
        torch.testing.assert_close(result.values, restored, atol=1e-5, rtol=0)


def test_per_position_patches_land_on_their_position(model, prompts):
    """Only encoder position 2 differs, so at the embedding (layer 0's resid_pre) patching position 2 restores the
    clean run exactly and every other position is a no-op, whichever row of the batched sweep it ran in."""
    clean, enc_corrupt, _ = prompts
    one_per_forward = patch_residual(model, clean, enc_corrupt, logit_diff, stack="encoder", batch_rows=1)
    batched = patch_residual(model, clean, enc_corrupt, logit_diff, stack="encoder", batch_rows=5)
    torch.testing.assert_close(batched.values, one_per_forward.values, atol=1e-5, rtol=0)
    first = batched.values[0]
    expected = torch.full_like(first, batched.corrupted_metric)
    expected[2] = batched.clean_metric
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)
    assert batched.values.shape == (3, 7) and len(batched.col_labels) == 7
    edges_1 = patch_cross_attn_edges(model, clean, enc_corrupt, logit_diff, layers=[1], head=1, batch_rows=1)
    edges_6 = patch_cross_attn_edges(model, clean, enc_corrupt, logit_diff, layers=[1], head=1, batch_rows=6)
    torch.testing.assert_close(edges_6.values, edges_1.values, atol=1e-5, rtol=0)
    assert edges_6.values.shape == (4, 7) and edges_6.row_labels[1] == "L1 1"


def test_edge_attributions_sum_to_each_query_position_of_the_cross_attention(model, prompts):
    """An edge (q <- k) carries pattern[q, k] * v[k] of z[q]; summed over k its patch is z's patch at q, so the
    (linear) attribution of all edges of (layer, q) equals that of patching every head's z at q."""
    clean, enc_corrupt, _ = prompts
    edges = patch_cross_attn_edges(model, clean, enc_corrupt, logit_diff, method="attribution")
    heads = patch_heads(model, clean, enc_corrupt, logit_diff, attn="cross", per_position=True, method="attribution")
    L, H, D = model.cfg.n_decoder_layers, model.cfg.n_heads, 4
    edge_effect = (edges.values - edges.corrupted_metric).view(L, D, -1).sum(-1)  # [layer, dec_pos]
    head_effect = (heads.values - heads.corrupted_metric).view(L, H, D).sum(1)  # [layer, dec_pos]
    torch.testing.assert_close(edge_effect, head_effect, atol=1e-5, rtol=1e-4)
    assert edge_effect.abs().max() > 1e-3


@pytest.fixture(scope="module")
def near_linear():
    """A smooth (gated-GELU) model and two prompts whose only difference is one token with an embedding 3% away
    from the other's, so every activation moves a little and metrics are close to linear in each of them."""
    cfg = HookedT5Config(
        d_model=32,
        d_head=8,
        n_heads=4,
        d_mlp=48,
        n_layers=2,
        n_decoder_layers=2,
        d_vocab=64,
        gated_mlp=True,
        act_fn="gelu_new",
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        tie_word_embeddings=False,
        scale_logits=False,
        seed=0,
    )
    model = HookedEncoderDecoder(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.embed.W_E[11] = model.embed.W_E[10] + 0.03 * torch.randn(cfg.d_model, generator=g)
    tokens = torch.randint(3, 64, (2, 6), generator=g)
    tokens[:, 2] = 10
    corrupted = tokens.clone()
    corrupted[:, 2] = 11
    dec = torch.randint(3, 64, (2, 4), generator=g)
    return model, (tokens, dec), (corrupted, dec)


def ranks(x):
    return x.argsort().argsort().float()


@pytest.mark.parametrize("sweep,options", SWEEPS)
@pytest.mark.parametrize("gradient", ["corrupted", "mean"])
def test_attribution_patching_matches_activation_patching_near_linearity(near_linear, sweep, options, gradient):
    model, clean, corrupted = near_linear
    act = sweep(model, clean, corrupted, logit_diff, **options)
    att = sweep(model, clean, corrupted, logit_diff, method="attribution", gradient=gradient, **options)
    assert att.corrupted_metric == pytest.approx(act.corrupted_metric)
    assert att.clean_metric == pytest.approx(act.clean_metric)
    effect, estimate = act.values - act.corrupted_metric, att.values - att.corrupted_metric
    assert effect.abs().max() > 3e-3  # the patches do something measurable
    assert (estimate - effect).norm() / effect.norm() < 0.05
    big = effect.abs() > 0.1 * effect.abs().max()
    assert torch.equal(effect[big].sign(), estimate[big].sign())
    moving = effect.abs() > 1e-3 * effect.abs().max()  # entries the corruption reaches at all
    spearman = torch.corrcoef(torch.stack([ranks(effect[moving]), ranks(estimate[moving])]))[0, 1]
    assert spearman > 0.95


@pytest.mark.slow
def test_compiled_sweep_compiles_one_graph(model, prompts):
    from torch._dynamo.utils import counters

    clean, enc_corrupt, _ = prompts
    eager = patch_heads(model, clean, enc_corrupt, logit_diff, stack="encoder", batch_rows=4)  # 12 heads: 3 chunks
    torch._dynamo.reset()
    counters.clear()
    compiled = patch_heads(model, clean, enc_corrupt, logit_diff, stack="encoder", batch_rows=4, compile="eager")
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(compiled.values, eager.values, atol=1e-5, rtol=0)


def test_patching_results_plot(model, prompts, tmp_path):
    clean, enc_corrupt, _ = prompts
    result = patch_residual(model, clean, enc_corrupt, logit_diff, stack="encoder")
    for normalize in (False, True):
        path = tmp_path / f"resid_{normalize}.png"
        figure = result.plot(path, normalize=normalize)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == result.row_labels


def test_patching_errors_say_what_is_wrong(model, prompts):
    clean, enc_corrupt, _ = prompts
    shorter = RunInputs(clean.input[:, :5], clean.decoder_input)
    with pytest.raises(ValueError, match="shapes differ"):
        patch_residual(model, clean, shorter, logit_diff)
    with pytest.raises(ValueError, match="differentiable scalar"):
        patch_residual(model, clean, enc_corrupt, lambda logits: logit_diff(logits).item(), method="attribution")
    with pytest.raises(ValueError, match="site="):
        patch_residual(model, clean, enc_corrupt, logit_diff, site="resid")
    with pytest.raises(ValueError, match="valid 0..1"):
        patch_heads(model, clean, enc_corrupt, logit_diff, layers=[2])
    with pytest.raises(ValueError, match="only in the decoder"):
        patch_heads(model, clean, enc_corrupt, logit_diff, stack="encoder", attn="cross")
    with pytest.raises(ValueError, match="method="):
        patch_cross_attn_edges(model, clean, enc_corrupt, logit_diff, method="gradient")
