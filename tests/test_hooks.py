"""The hook API: every hook point fires, lifecycle of hooks, caching, and clear errors on bad input."""

import pytest
import torch
from t5_fixtures import hf_t5, hooked_from, random_batch

from t5hooks import ActivationCache, HookedEncoderDecoder, HookedT5Config, HookPoint


def tiny(gated=False, use_attn_result=False, **kw):
    cfg = HookedT5Config(
        d_model=16,
        d_head=4,
        n_heads=2,
        d_mlp=24,
        n_layers=2,
        n_decoder_layers=3,
        d_vocab=40,
        gated_mlp=gated,
        act_fn="gelu_new" if gated else "relu",
        use_attn_result=use_attn_result,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        seed=0,
        **kw,
    )
    return HookedEncoderDecoder(cfg)


def batch(model, enc=7, dec=5):
    tokens, mask, dec_tokens, _ = random_batch(model.cfg.d_vocab, 2, enc, dec)
    return tokens, mask, dec_tokens


@pytest.mark.parametrize("gated,use_attn_result", [(False, False), (True, True)])
def test_every_hook_point_fires_with_documented_shapes(gated, use_attn_result):
    model = tiny(gated, use_attn_result)
    tokens, mask, dec = batch(model)
    fired = {}

    def record(x, hook):
        fired[hook.name] = tuple(x.shape)

    model.run_with_hooks(tokens, dec, one_zero_attention_mask=mask, fwd_hooks=[(lambda n: True, record)])
    assert set(fired) == set(model.hook_dict)  # no dead hook points
    B, E, D, H, dh, dm, dmlp = 2, 7, 5, 2, 4, 16, 24
    assert fired["hook_embed"] == (B, E, dm)
    assert fired["hook_decoder_embed"] == (B, D, dm)
    assert fired["hook_encoder_out"] == (B, E, dm)
    assert fired["unembed.hook_in"] == (B, D, dm)
    assert fired["encoder.0.attn.rel_pos_hook"] == (1, H, E, E)
    assert fired["decoder.0.attn.rel_pos_hook"] == (1, H, D, D)
    assert fired["encoder.1.attn.hook_q"] == (B, E, H, dh)
    assert fired["decoder.2.cross_attn.hook_k"] == (B, E, H, dh)
    assert fired["decoder.2.cross_attn.hook_pattern"] == (B, H, D, E)
    assert fired["decoder.1.attn.hook_attn_scores"] == (B, H, D, D)
    assert fired["encoder.1.ln2.hook_scale"] == (B, E, 1)
    assert fired["decoder.0.ln3.hook_normalized"] == (B, D, dm)
    assert fired["decoder.0.hook_resid_mid_cross"] == (B, D, dm)
    assert fired["encoder.0.mlp.hook_post"] == (B, E, dmlp)
    assert ("encoder.0.mlp.hook_pre_linear" in fired) == gated
    if use_attn_result:
        assert fired["decoder.1.cross_attn.hook_result"] == (B, D, H, dm)
    else:
        assert not any(name.endswith("hook_result") for name in fired)


def test_attn_result_sums_to_attn_out():
    model = tiny(use_attn_result=True)
    tokens, mask, dec = batch(model)
    _, cache = model.run_with_cache(tokens, dec, one_zero_attention_mask=mask)
    torch.testing.assert_close(
        cache["encoder.1.attn.hook_result"].sum(2), cache["encoder.1.hook_attn_out"], atol=1e-5, rtol=0
    )
    model.set_use_attn_result(False)
    assert "encoder.1.attn.hook_result" not in model.hook_dict


def test_names_filter_forms_and_cache_object():
    model = tiny()
    tokens, mask, dec = batch(model)
    _, by_glob = model.run_with_cache(tokens, dec, names_filter="encoder.*.hook_resid_post")
    assert isinstance(by_glob, ActivationCache)
    assert list(by_glob) == ["encoder.0.hook_resid_post", "encoder.1.hook_resid_post"]
    _, by_list = model.run_with_cache(tokens, dec, names_filter=["hook_embed", "decoder.*.hook_attn_out"])
    assert list(by_list) == ["hook_embed"] + [f"decoder.{l}.hook_attn_out" for l in range(3)]
    _, by_fn = model.run_with_cache(tokens, dec, names_filter=lambda n: n.endswith("hook_z"))
    assert len(by_fn) == 2 + 3 * 2
    _, single = model.run_with_cache(tokens[:1], dec[:1], names_filter="hook_embed", remove_batch_dim=True)
    assert single["hook_embed"].shape == (7, 16)
    _, full = model.run_with_cache(tokens[:1], dec[:1], names_filter="hook_embed")
    assert full.remove_batch_dim()["hook_embed"].shape == (7, 16)
    assert by_glob.to("cpu") is by_glob
    assert set(by_glob.keys()) == set(dict(by_glob.items()))


def test_hooks_context_nesting_and_permanent_hooks():
    model = tiny()
    tokens, mask, dec = batch(model)
    calls = []

    def tag(label):
        def fn(x, hook):
            calls.append(label)

        return fn

    model.add_perma_hook("hook_embed", tag("perma"))
    with model.hooks(fwd_hooks=[("hook_embed", tag("outer"))]):
        with model.hooks(fwd_hooks=[("hook_embed", tag("inner"))]):
            model(tokens, dec)
            assert calls == ["perma", "outer", "inner"]
        calls.clear()
        model(tokens, dec)
        assert calls == ["perma", "outer"]  # inner context's hook removed, outer's kept
    calls.clear()
    model.reset_hooks()
    model(tokens, dec)
    assert calls == ["perma"]  # permanent hooks survive reset_hooks
    model.add_hook("hook_embed", tag("first"), prepend=True)
    calls.clear()
    model(tokens, dec)
    assert calls == ["first", "perma"]
    model.reset_hooks(including_permanent=True)
    calls.clear()
    model(tokens, dec)
    assert calls == []


def test_forward_hook_can_patch():
    model = tiny()
    tokens, mask, dec = batch(model)
    clean = model(tokens, dec)
    patched = model.run_with_hooks(tokens, dec, fwd_hooks=[("decoder.2.hook_resid_post", lambda x, hook: x * 0)])
    assert torch.allclose(patched, torch.zeros_like(patched))
    assert not torch.allclose(clean, patched)


def test_backward_hooks_see_gradients():
    model = tiny()
    tokens, mask, dec = batch(model)
    labels = dec.clone()
    grads = {}

    def save_grad(g, hook):
        grads[hook.name] = g.clone()

    acts = {}

    def keep(x, hook):
        x.retain_grad()
        acts[hook.name] = x

    name = "encoder.1.hook_resid_mid"
    with model.hooks(fwd_hooks=[(name, keep)], bwd_hooks=[(name, save_grad)]):
        loss = model(tokens, dec, labels=labels, return_type="loss")
        loss.backward()
    torch.testing.assert_close(grads[name], acts[name].grad)
    # gradient caching
    loss, cache = model.run_with_cache(
        tokens, dec, labels=labels, return_type="loss", incl_bwd=True, names_filter="encoder.1.hook_resid_mid"
    )
    torch.testing.assert_close(cache[name + "_grad"], grads[name], atol=1e-6, rtol=0)
    with pytest.warns(UserWarning, match="before any backward"):
        model.run_with_hooks(tokens, dec, bwd_hooks=[(name, save_grad)])


def test_backward_hook_can_replace_gradient():
    model = tiny()
    tokens, mask, dec = batch(model)
    with model.hooks(bwd_hooks=[("encoder.0.hook_resid_post", lambda g, hook: torch.zeros_like(g))]):
        model(tokens, dec, labels=dec, return_type="loss").backward()
    # Nothing flows back past the zeroed gradient, except through hook_embed's other path (none): W_E gets only
    # the decoder embedding and unembedding gradient, encoder layer 0 gets none.
    assert torch.all(model.encoder[0].mlp.in_proj.grad == 0)


def test_hook_dict_and_mod_dict():
    model = tiny()
    assert isinstance(model.hook_dict["encoder.0.attn.hook_q"], HookPoint)
    assert model.mod_dict["decoder.1.cross_attn"] is model.decoder[1].cross_attn
    assert model.hook_dict["decoder.1.cross_attn.hook_z"].layer() == 1
    assert all(isinstance(h, HookPoint) for h in model.hook_dict.values())


# ---- bad input: a clear error, and nothing changed ------------------------------------------------------
def test_unknown_hook_name_suggests_close_matches():
    model = tiny()
    with pytest.raises(ValueError, match="did you mean: encoder.0.hook_resid_post"):
        model.add_hook("encoder.0.hook_resid_pots", lambda x, hook: None)
    with pytest.raises(ValueError, match="use_attn_result"):
        model.run_with_cache(*batch(model)[::2], names_filter="encoder.0.attn.hook_result")
    with pytest.raises(ValueError, match="no hook point matches"):
        model.add_hook(["hook_embed", "nonsense.*"], lambda x, hook: None)
    assert not any(hp.has_hooks() for hp in model.hook_points())  # the valid name was not half-added


def test_hook_returning_wrong_shape_is_an_error_and_hooks_are_removed():
    model = tiny()
    tokens, mask, dec = batch(model)
    with pytest.raises(ValueError, match=r"encoder.0.hook_resid_post.*returned shape \(2, 7\).*\(2, 7, 16\)"):
        model.run_with_hooks(tokens, dec, fwd_hooks=[("encoder.0.hook_resid_post", lambda x, hook: x[..., 0])])
    with pytest.raises(TypeError, match="returned str"):
        model.run_with_hooks(tokens, dec, fwd_hooks=[("hook_embed", lambda x, hook: "oops")])
    assert not any(hp.has_hooks() for hp in model.hook_points())


def test_bad_tokens_and_masks():
    model = tiny()
    tokens, mask, dec = batch(model)
    with pytest.raises(TypeError, match="integer token ids"):
        model(tokens.float(), dec)
    with pytest.raises(ValueError, match=r"valid ids are 0..39"):
        model(tokens + 100, dec)
    with pytest.raises(ValueError, match=r"valid ids are 0..39"):
        model(tokens, dec - 50)
    with pytest.raises(ValueError, match="one_zero_attention_mask has shape"):
        model(tokens, dec, one_zero_attention_mask=mask[:, :3])
    with pytest.raises(ValueError, match="decoder_attention_mask has shape"):
        model(tokens, dec, decoder_attention_mask=mask)
    with pytest.raises(ValueError, match="no tokenizer"):
        model("hello", dec)
    with pytest.raises(ValueError, match="needs labels"):
        model(tokens, dec, return_type="loss")
    with pytest.raises(ValueError, match="return_type"):
        model(tokens, dec, return_type="probs")
    with pytest.raises(ValueError, match="decoder_input batch 2 != input batch 3"):
        model(torch.cat([tokens, tokens[:1]]), dec)
    torch.testing.assert_close(model(tokens, dec[:1]), model(tokens, dec[:1].expand(2, -1)))  # one prompt, whole batch


def test_string_inputs_with_a_tokenizer():
    from transformers import ByT5Tokenizer

    hf = hf_t5("byt5")
    tok = ByT5Tokenizer()
    model = hooked_from(hf, tokenizer=tok)
    texts = ["hello world", "hi"]
    tokens, text_mask = model.to_tokens(texts)
    assert tokens.shape == (2, len("hello world") + 1)  # bytes + EOS, padded
    assert model.to_string(tokens[0]) == "hello world</s>"
    assert model.to_str_tokens("hi") == ["h", "i", "</s>"]
    with torch.no_grad():
        from_text = model(texts, "ok")[0]
        dec = torch.tensor([[0, ord("o") + 3, ord("k") + 3]]).expand(2, -1)  # start + text, no EOS
        from_ids = model(tokens, dec, one_zero_attention_mask=text_mask)[0]
    torch.testing.assert_close(from_text, from_ids)


def test_moves_keep_cfg_in_step():
    model = tiny()
    assert model.to(torch.float64, print_details=False) is model
    assert model.cfg.dtype == torch.float64 and model.W_E.dtype == torch.float64
    assert model.cpu().cfg.device == "cpu"
    tokens, mask, dec = batch(model)
    assert model(tokens, dec).dtype == torch.float64
