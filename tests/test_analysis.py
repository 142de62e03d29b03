"""Encoder-decoder-aware cache helpers: names, residual decompositions, T5's norms, logit lens, attribution."""

import pytest
import torch
from t5_fixtures import hf_t5, hooked_from, random_batch

from t5hooks import ActivationCache, HookedEncoderDecoder
from t5hooks.analysis import head_logit_attribution, logit_lens
from t5hooks.analysis.cache import act_name

STACKS = ("encoder", "decoder")


@pytest.fixture(scope="module", params=["t5_v1_0", "t5_v1_1"])
def run(request):
    """A model with random layer-norm weights (so norms are not identities), tied+scaled (v1.0) or untied (v1.1),
    and a padded batch."""
    model = hooked_from(hf_t5(request.param))
    tokens, mask, dec, _ = random_batch(model.cfg.d_vocab, 2, 7, 5)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, dec, one_zero_attention_mask=mask)
    return model, logits, cache


def n_layers(model, stack):
    return model.cfg.n_layers if stack == "encoder" else model.cfg.n_decoder_layers


def read_points(model, stack):
    """(layer, kwargs, hook name of the residual stream read there) for every sublayer input of a stack."""
    n = n_layers(model, stack)
    points = [(n, {}, f"{stack}.{n - 1}.hook_resid_post")]
    for l in range(n):
        points.append((l, {}, f"{stack}.{l}.hook_resid_pre"))
        if stack == "decoder":
            points.append((l, {"cross_attn_input": True}, f"decoder.{l}.hook_resid_mid"))
            points.append((l, {"mlp_input": True}, f"decoder.{l}.hook_resid_mid_cross"))
        else:
            points.append((l, {"mlp_input": True}, f"encoder.{l}.hook_resid_mid"))
    return points


def test_act_name_short_names_and_errors():
    assert act_name("pattern", 3, attn="cross") == "decoder.3.cross_attn.hook_pattern"
    assert act_name("attn", 1, "encoder") == "encoder.1.attn.hook_pattern"  # TransformerLens alias
    assert act_name("resid_pre", 0, "encoder") == "encoder.0.hook_resid_pre"
    assert act_name("attn_out", 2, attn="cross") == "decoder.2.hook_cross_attn_out"
    assert act_name("resid_mid_cross", 1) == "decoder.1.hook_resid_mid_cross"
    assert act_name("post", 1, "encoder") == "encoder.1.mlp.hook_post"
    assert act_name("scale", 1, "encoder", ln="ln2") == "encoder.1.ln2.hook_scale"
    assert act_name("normalized", 0, ln="ln3") == "decoder.0.ln3.hook_normalized"
    assert act_name("scale") == "decoder_final_ln.hook_scale"
    assert act_name("embed", stack="encoder") == "hook_embed"
    assert act_name("embed") == "hook_embed"  # TransformerLens's name (test_tl_oracle.py)
    assert act_name("embed", stack="decoder") == act_name("decoder_embed") == "hook_decoder_embed"
    assert act_name("encoder_out") == "hook_encoder_out"
    assert act_name("rel_pos", stack="encoder") == "encoder.0.attn.rel_pos_hook"
    assert act_name("rel_pos", 2, stack="decoder") == "decoder.2.attn.rel_pos_hook"  # UMT5: one per layer
    assert act_name("decoder.0.hook_resid_pre") == "decoder.0.hook_resid_pre"  # full names pass through
    with pytest.raises(ValueError, match="only in the decoder"):
        act_name("pattern", 0, "encoder", attn="cross")
    with pytest.raises(ValueError, match="ln= one of"):
        act_name("scale", 0, "encoder", ln="ln3")
    with pytest.raises(ValueError, match="pass layer="):
        act_name("resid_pre")
    with pytest.raises(ValueError, match="unknown activation 'resid'"):
        act_name("resid", 0)
    with pytest.raises(ValueError, match="stack="):
        act_name("resid_pre", 0, "middle")


def test_tuple_keys_resolve_through_act_name(run):
    model, _, cache = run
    n_enc = model.cfg.n_layers
    assert cache["pattern", 0, "cross"] is cache["decoder.0.cross_attn.hook_pattern"]
    assert cache["resid_post", -1, "encoder"] is cache[f"encoder.{n_enc - 1}.hook_resid_post"]
    assert cache["z", "encoder", 1] is cache["z", 1, "encoder"] is cache["encoder.1.attn.hook_z"]  # any order
    assert cache["scale", 1, "ln3"] is cache["decoder.1.ln3.hook_scale"]
    assert cache["normalized", "encoder"] is cache["encoder_final_ln.hook_normalized"]
    assert ("pattern", 0, "cross") in cache and ("pattern", 0, "encoder", "cross") not in cache
    # TransformerLens's layer types are accepted (the activation name already implies them).
    assert cache["post", 0, "mlp"] is cache["decoder.0.mlp.hook_post"]
    assert cache["pattern", 0, "attn"] is cache["decoder.0.attn.hook_pattern"]
    assert cache["scale", "ln_final"] is cache["decoder_final_ln.hook_scale"]
    with pytest.raises(KeyError, match="cannot read 'bogus'"):
        cache["post", 0, "bogus"]
    with pytest.raises(KeyError, match="did you mean"):
        cache["decoder.0.hook_resid_prex"]


@pytest.mark.parametrize("stack", STACKS)
def test_decompositions_sum_to_the_residual_stream_they_decompose(run, stack):
    model, _, cache = run
    for layer, where, name in read_points(model, stack):
        target = cache[name]
        parts, labels = cache.decompose_resid(layer, return_labels=True, stack=stack, **where)
        assert labels[0] == "embed" and len(labels) == parts.shape[0]
        torch.testing.assert_close(parts.sum(0), target, atol=1e-5, rtol=0)
        for expand_neurons in (True, False):
            full = cache.get_full_resid_decomposition(layer, expand_neurons=expand_neurons, stack=stack, **where)
            torch.testing.assert_close(full.sum(0), target, atol=1e-4, rtol=0)
    # Which sublayers come before the decoder's cross-attention input of layer 1: its self-attention, not more.
    if stack == "decoder":
        _, labels = cache.decompose_resid(1, cross_attn_input=True, return_labels=True)
        assert labels == ["embed", "0_attn_out", "0_cross_attn_out", "0_mlp_out", "1_attn_out"]
        _, labels = cache.decompose_resid(1, mode="cross_attn", return_labels=True)
        assert labels == ["embed", "0_cross_attn_out"]


@pytest.mark.parametrize("stack", STACKS)
def test_apply_ln_to_stack_reproduces_t5_norm_outputs(run, stack):
    model, _, cache = run
    n = n_layers(model, stack)
    final = cache[f"{stack}.{n - 1}.hook_resid_post"][None]
    # The stack's final norm: what cross-attention reads (encoder), what W_U reads after T5's scaling (decoder).
    expected = cache["hook_encoder_out"] if stack == "encoder" else cache["unembed.hook_in"]
    torch.testing.assert_close(cache.apply_ln_to_stack(final, stack=stack)[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        cache.apply_ln_to_stack(final, stack=stack, recompute_ln=True)[0], expected, atol=1e-5, rtol=0
    )
    for l in range(n):
        mlp_read = cache.accumulated_resid(l, mlp_input=True, stack=stack)[-1:]
        torch.testing.assert_close(
            cache.apply_ln_to_stack(mlp_read, l, mlp_input=True, stack=stack)[0],
            cache[f"{stack}.{l}.{'ln3' if stack == 'decoder' else 'ln2'}.hook_normalized"]
            * model.mod_dict[f"{stack}.{l}.{'ln3' if stack == 'decoder' else 'ln2'}"].w,
            atol=1e-5,
            rtol=0,
        )
        ln1 = cache.apply_ln_to_stack(cache[f"{stack}.{l}.hook_resid_pre"][None], l, stack=stack)[0]
        w = model.mod_dict[f"{stack}.{l}.ln1"].w
        torch.testing.assert_close(ln1, cache[f"{stack}.{l}.ln1.hook_normalized"] * w, atol=1e-5, rtol=0)
    # pos_slice picks the matching scales.
    sliced = cache.apply_ln_to_stack(final[:, :, -1], pos_slice=-1, stack=stack)[0]
    torch.testing.assert_close(sliced, expected[:, -1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="out of range"):
        cache.apply_ln_to_stack(final, layer=n + 1, stack=stack)
    with pytest.raises(ValueError, match="final norm input"):
        cache.apply_ln_to_stack(final, mlp_input=True, stack=stack)


def test_read_point_errors(run):
    _, _, cache = run
    with pytest.raises(ValueError, match="only for stack='decoder'"):
        cache.decompose_resid(0, cross_attn_input=True, stack="encoder")
    with pytest.raises(ValueError, match="exclusive"):
        cache.accumulated_resid(0, mlp_input=True, cross_attn_input=True)
    with pytest.raises(ValueError, match="mode="):
        cache.decompose_resid(mode="heads")


def test_accumulated_resid_points_and_labels(run):
    model, _, cache = run
    resid, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "0_mid_cross", "1_pre", "1_mid", "1_mid_cross", "final_post"]
    assert torch.equal(resid[4], cache["decoder.1.hook_resid_mid"])
    assert torch.equal(resid[-1], cache["decoder.1.hook_resid_post"])
    resid, labels = cache.accumulated_resid(1, mlp_input=True, return_labels=True, pos_slice=[0, 2], stack="encoder")
    assert labels == ["0_pre", "1_pre", "1_mid"]
    assert torch.equal(resid[2], cache["encoder.1.hook_resid_mid"][:, [0, 2]])


def test_logit_lens_final_point_reproduces_the_logits(run):
    model, logits, cache = run
    lens = logit_lens(model, cache, k=3)
    assert lens.labels == [f"{l}_pre" for l in range(model.cfg.n_decoder_layers)] + ["final_post"]
    assert lens.logits.shape == (len(lens.labels), *logits.shape)
    torch.testing.assert_close(lens.logits[-1], logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(lens.top_ids[-1], logits.topk(3, dim=-1).indices)
    # Earlier points are read through the final norm with their own RMS, not the last layer's.
    last_pos = logit_lens(model, cache, pos_slice=-1)
    assert last_pos.logits.shape == (len(lens.labels), 2, 1, model.cfg.d_vocab)
    torch.testing.assert_close(last_pos.logits[:, :, 0], lens.logits[:, :, -1])
    with pytest.raises(ValueError, match="different model"):
        logit_lens(hooked_from(hf_t5("t5_v1_0")), cache)


def test_direct_logit_attribution_sums_to_the_logit_difference(run):
    model, logits, cache = run
    B = logits.shape[0]
    right, wrong = torch.tensor([5, 9]), torch.tensor([7, 11])
    expected = logits[torch.arange(B), -1, right] - logits[torch.arange(B), -1, wrong]  # [batch]
    parts = cache.decompose_resid(pos_slice=-1)  # [components, batch, d_model]
    attrs = cache.logit_attrs(parts, right, wrong, pos_slice=-1)  # [components, batch]
    torch.testing.assert_close(attrs.sum(0), expected, atol=1e-4, rtol=0)
    # The same attribution spelled out: normalise with the cached final-norm scale, then dot with W_U columns.
    normalised = cache.apply_ln_to_stack(parts, pos_slice=-1)
    manual = (normalised * (model.W_U[:, right] - model.W_U[:, wrong]).T).sum(-1)
    torch.testing.assert_close(attrs, manual, atol=1e-5, rtol=0)
    # Every position, with per-position tokens [batch, pos], through the full decomposition.
    targets = torch.randint(0, model.cfg.d_vocab, logits.shape[:2], generator=torch.Generator().manual_seed(0))
    full = cache.get_full_resid_decomposition()
    attrs = cache.logit_attrs(full, targets)
    torch.testing.assert_close(attrs.sum(0), logits.gather(-1, targets[..., None])[..., 0], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="same shape"):
        cache.logit_attrs(parts, right, 3, pos_slice=-1)


def test_stack_head_results_from_z_and_W_O_equal_hook_result():
    model = hooked_from(hf_t5("t5_v1_1"))
    model.set_use_attn_result(True)
    tokens, mask, dec, _ = random_batch(model.cfg.d_vocab, 2, 7, 5)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, dec, one_zero_attention_mask=mask)
    without = ActivationCache({k: v for k, v in cache.items() if not k.endswith("hook_result")}, model)
    for stack, attn in (("encoder", "self"), ("decoder", "self"), ("decoder", "cross")):
        cached, labels = cache.stack_head_results(return_labels=True, stack=stack, attn=attn)
        computed = without.stack_head_results(stack=stack, attn=attn)
        n = model.cfg.n_layers if stack == "encoder" else model.cfg.n_decoder_layers
        pos = tokens.shape[1] if stack == "encoder" else 5
        assert cached.shape == (n * model.cfg.n_heads, 2, pos, model.cfg.d_model)
        assert labels[model.cfg.n_heads + 1] == ("L1H1_cross" if attn == "cross" else "L1H1")
        torch.testing.assert_close(computed, cached, atol=1e-5, rtol=0)
    cross_heads_0 = without.stack_head_results(1, attn="cross")
    torch.testing.assert_close(cross_heads_0.sum(0), cache["decoder.0.hook_cross_attn_out"], atol=1e-5, rtol=0)
    remainder = without.stack_head_results(1, incl_remainder=True, stack="encoder")
    torch.testing.assert_close(remainder.sum(0), cache["encoder.1.hook_resid_pre"], atol=1e-5, rtol=0)


def test_stack_neuron_results_sum_to_each_mlp_output(run):
    model, _, cache = run
    neurons, labels = cache.stack_neuron_results(2, return_labels=True, stack="encoder")
    assert labels[model.cfg.d_mlp] == "L1N0"
    per_layer = neurons.view(2, model.cfg.d_mlp, *neurons.shape[1:]).sum(1)
    for l in range(2):
        torch.testing.assert_close(per_layer[l], cache[f"encoder.{l}.hook_mlp_out"], atol=1e-5, rtol=0)
    some, labels = cache.stack_neuron_results(1, neuron_slice=[3, 7], pos_slice=0, return_labels=True)
    assert labels == ["L0N3", "L0N7"] and some.shape == (2, 2, model.cfg.d_model)


def test_head_attributions_with_mlps_and_embedding_add_up_to_the_logit_difference(run, tmp_path):
    model, logits, cache = run
    right, wrong = 5, 7
    self_heads = head_logit_attribution(model, cache, right, wrong, attn="self")
    cross_heads = head_logit_attribution(model, cache, right, wrong, attn="cross")
    assert self_heads.values.shape == (model.cfg.n_decoder_layers, model.cfg.n_heads)
    assert self_heads.row_labels[-1] == f"L{model.cfg.n_decoder_layers - 1}" and cross_heads.col_labels[0] == "H0"
    rest = cache.decompose_resid(mode="mlp", pos_slice=-1)  # embed + MLPs
    rest_attr = cache.logit_attrs(rest, right, wrong, pos_slice=-1).sum(0).mean()
    total = self_heads.values.sum() + cross_heads.values.sum() + rest_attr
    expected = (logits[:, -1, right] - logits[:, -1, wrong]).mean()
    torch.testing.assert_close(total, expected, atol=1e-4, rtol=0)
    path = tmp_path / "heads.png"
    fig = cross_heads.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.axes


def test_batchless_cache_helpers():
    model = hooked_from(hf_t5("t5_v1_0"))
    tokens, _, dec, _ = random_batch(model.cfg.d_vocab, 1, 6, 4)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, dec, remove_batch_dim=True)
    parts = cache.decompose_resid()  # [components, pos, d_model]
    torch.testing.assert_close(parts.sum(0), cache["decoder.1.hook_resid_post"], atol=1e-5, rtol=0)
    attrs = cache.logit_attrs(parts, 9, has_batch_dim=False)  # [components, pos]
    torch.testing.assert_close(attrs.sum(0), logits[0, :, 9], atol=1e-4, rtol=0)
    torch.testing.assert_close(logit_lens(model, cache).logits[-1, 0], logits[0], atol=1e-5, rtol=1e-5)


def test_logit_lens_table_names_tokens_with_the_tokenizer():
    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny-random")
    with torch.no_grad():
        logits, cache = model.run_with_cache("the cat sat", "le chat")
    lens = logit_lens(model, cache, k=3)
    decoder_tokens = model.prepare_inputs("the cat sat", "le chat")[2]
    table = lens.table(model, positions=[0, -1], decoder_tokens=decoder_tokens)
    assert table.count("final_post") == 2 and "decoder position 7 (reads 't')" in table  # no EOS after decoder text
    top = model.tokenizer.convert_ids_to_tokens([int(logits[0, -1].argmax())])[0]
    final_row = [line for line in table.splitlines() if line.startswith("final_post")][-1]
    assert final_row.split()[1] == repr(top)
    with pytest.raises(ValueError, match="out of range"):
        lens.table(model, positions=[99])
