"""The TransformerLens calls researchers type, on a T5: the reference's loading signature and processing switches,
TL-order ActivationCache helpers (decoder by default) equal to the stack-explicit calls, model helpers and
`t5hooks.utils` — checked against Hugging Face numbers where HF has them."""

import inspect
import logging

import pytest
import torch
from t5_fixtures import hf_t5, hooked_from, random_batch

from t5hooks import HookedEncoderDecoder, utils
from t5hooks.pretrained import tiny_config


@pytest.fixture(scope="module")
def hf():
    return hf_t5("t5_v1_1")


@pytest.fixture(scope="module")
def run(hf):
    model = hooked_from(hf)
    tokens, mask, dec, _ = random_batch(128, 3, 6, 4)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, dec, "logits", mask)
    return model, (tokens, mask, dec), logits, cache


# ---- loading -------------------------------------------------------------------------------------------
def test_from_pretrained_signature_and_processing_switches(hf):
    params = inspect.signature(HookedEncoderDecoder.from_pretrained).parameters
    assert list(params)[:8] == [
        "model_name",
        "checkpoint_index",
        "checkpoint_value",
        "hf_model",
        "device",
        "tokenizer",
        "move_to_device",
        "dtype",
    ]
    assert params["dtype"].default is torch.float32 and params["move_to_device"].default is True
    tokens, mask, dec, _ = random_batch(128, 2, 6, 4)
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=mask, decoder_input_ids=dec).logits

    plain = hooked_from(hf)
    assert not torch.equal(plain.encoder[0].ln1.w, torch.ones_like(plain.encoder[0].ln1.w))  # no fold by default
    assert hooked_from(hf, dtype=None).cfg.dtype == torch.float32
    assert hooked_from(hf, torch_dtype=torch.float64).W_E.dtype == torch.float64
    assert hooked_from(hf, dtype="bfloat16").cfg.dtype == torch.bfloat16

    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("t5hooks")  # the package logger: whichever module logs it
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        noop = hooked_from(hf, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
    finally:
        logger.removeHandler(handler)
    assert len([r for r in records if "no-op" in r.getMessage()]) == 1
    for name, value in plain.state_dict().items():
        assert torch.equal(noop.state_dict()[name], value), name  # exact identities for T5

    for kwargs in [
        dict(fold_ln=True),
        dict(refactor_factored_attn_matrices=True),
        dict(fold_ln=True, refactor_factored_attn_matrices=True),
    ]:
        processed = hooked_from(hf, **kwargs)
        with torch.no_grad():
            torch.testing.assert_close(processed(tokens, dec, "logits", mask), ref, atol=1e-4, rtol=0)
    folded = hooked_from(hf, fold_ln=True)
    assert torch.equal(folded.decoder[1].ln3.w, torch.ones_like(folded.decoder[1].ln3.w))

    with pytest.raises(ValueError, match="n_devices"):
        hooked_from(hf, n_devices=2)
    with pytest.raises(ValueError, match="checkpoint"):
        HookedEncoderDecoder.from_pretrained("t5hooks-tiny", checkpoint_index=3)


def test_refactor_factored_attn_matrices_balances_the_factors(hf):
    model = hooked_from(hf)
    QK, OV, QKc = model.QK.AB.clone(), model.OV.AB.clone(), model.QK_cross.AB.clone()
    model.refactor_factored_attn_matrices()
    torch.testing.assert_close(model.QK.AB, QK, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.OV.AB, OV, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.QK_cross.AB, QKc, atol=1e-5, rtol=1e-4)
    # Both factors carry sqrt(S): W_Q^T W_Q == W_K^T W_K == diag(S), and W_V^T W_V == W_O W_O^T == diag(S).
    W_Q, W_K, W_V, W_O = model.W_Q, model.W_K, model.W_V, model.W_O
    gram_q = W_Q.transpose(-1, -2) @ W_Q
    torch.testing.assert_close(gram_q, W_K.transpose(-1, -2) @ W_K, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gram_q, torch.diag_embed(gram_q.diagonal(dim1=-2, dim2=-1)), atol=1e-4, rtol=0)
    torch.testing.assert_close(W_V.transpose(-1, -2) @ W_V, W_O @ W_O.transpose(-1, -2), atol=1e-4, rtol=1e-4)


def test_constructor_kwargs_and_to_positional():
    model = HookedEncoderDecoder(tiny_config(n_layers=1, n_decoder_layers=1), None, True, use_attn_result=True)
    assert model.cfg.use_attn_result and "encoder.0.attn.hook_result" in model.hook_dict
    assert model.to("cpu", False) is model
    with pytest.raises(ValueError, match="unknown HookedT5Config fields"):
        HookedEncoderDecoder(tiny_config(), not_a_field=1)


# ---- ActivationCache: TransformerLens's signatures, the decoder by default --------------------------------
def test_tl_style_cache_calls_equal_the_stack_explicit_calls(run):
    model, _, logits, cache = run
    same = torch.testing.assert_close
    same(cache.accumulated_resid(), cache.accumulated_resid(stack="decoder"))
    same(cache.accumulated_resid(1, True, True, -1), cache.accumulated_resid(1, True, True, -1, stack="decoder"))
    same(cache.decompose_resid(None, False, "attn"), cache.decompose_resid(mode="attn", stack="decoder"))
    same(cache.stack_head_results(-1, False, True), cache.stack_head_results(incl_remainder=True, stack="decoder"))
    same(
        cache.stack_neuron_results(1, None, [0, 3]), cache.stack_neuron_results(1, neuron_slice=[0, 3], stack="decoder")
    )
    same(cache.get_full_resid_decomposition(1, True), cache.get_full_resid_decomposition(1, True, stack="decoder"))
    same(cache.stack_activation("pattern"), cache.stack_activation("pattern", stack="decoder"))
    same(cache.stack_activation("pattern", -1, "cross"), cache.stack_activation("pattern", attn="cross"))
    same(cache.stack_activation("scale", -1, "ln2"), cache.stack_activation("scale", ln="ln2", stack="decoder"))
    resid = cache.decompose_resid()
    same(cache.apply_ln_to_stack(resid, None, False, None), cache.apply_ln_to_stack(resid, stack="decoder"))
    # The decoder default is the stack whose output is the logits: the TL recipe reproduces them.
    normalised = cache.apply_ln_to_stack(cache.accumulated_resid()[-1:])
    same((normalised @ model.W_U)[0], logits, atol=1e-4, rtol=0)
    encoder = cache.accumulated_resid(stack="encoder")
    assert encoder.shape[0] == model.cfg.n_layers + 1
    with pytest.raises(TypeError, match="stack is a\\s+keyword"):
        cache.decompose_resid("encoder")


def test_cache_helpers_of_the_reference(run):
    model, (tokens, mask, dec), logits, cache = run
    same = torch.testing.assert_close
    sub = cache.apply_slice_to_batch_dim([0, 2])
    same(sub["decoder.0.hook_resid_post"], cache["decoder.0.hook_resid_post"][[0, 2]])
    same(sub["decoder.0.attn.rel_pos_hook"], cache["decoder.0.attn.rel_pos_hook"])  # shared by the batch
    one = cache.apply_slice_to_batch_dim(1)
    assert not one.has_batch_dim and one["hook_embed"].shape == cache["hook_embed"].shape[1:]
    # compute_head_results == the hook_result of a model with use_attn_result
    cache.compute_head_results()
    with_results = HookedEncoderDecoder(model.cfg, use_attn_result=True)
    with_results.load_state_dict(model.state_dict())
    with torch.no_grad():
        _, ref = with_results.run_with_cache(tokens, dec, "logits", mask, names_filter="*hook_result")
    for name in ref:
        same(cache[name], ref[name], atol=1e-5, rtol=0)
    neurons = cache.get_neuron_results(1)  # [batch, pos, d_mlp, d_model]
    same(neurons.sum(-2), cache["decoder.1.hook_mlp_out"], atol=1e-5, rtol=0)
    same(
        cache.get_neuron_results(0, [2, 5], -1, stack="encoder"),
        cache.get_neuron_results(0, stack="encoder")[:, -1, [2, 5]],
    )
    cache.toggle_autodiff(False)
    assert not torch.is_grad_enabled()
    cache.toggle_autodiff(True)
    assert torch.is_grad_enabled()


def test_run_with_cache_pos_slice(run):
    model, (tokens, mask, dec), _, full = run
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, dec, "logits", mask, pos_slice=-1)
    torch.testing.assert_close(cache["decoder.1.hook_resid_post"], full["decoder.1.hook_resid_post"][:, -1:])
    torch.testing.assert_close(cache["encoder.0.attn.hook_q"], full["encoder.0.attn.hook_q"][:, -1:])
    torch.testing.assert_close(
        cache["decoder.0.cross_attn.hook_pattern"], full["decoder.0.cross_attn.hook_pattern"][:, :, -1:]
    )
    with torch.no_grad():
        _, single = model.run_with_cache(
            tokens[:1], dec[:1], "logits", mask[:1], pos_slice=[0, 2], remove_batch_dim=True
        )
    torch.testing.assert_close(single["decoder.0.attn.hook_pattern"], full["decoder.0.attn.hook_pattern"][0, :, [0, 2]])


# ---- model helpers -------------------------------------------------------------------------------------
def test_model_token_helpers_loss_and_bias(hf):
    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny")
    assert model.to_single_token("a") == ord("a") + 3
    assert model.to_single_str_token(ord("a") + 3) == "a"
    with pytest.raises(ValueError, match="not one"):
        model.to_single_token("ab")
    assert model.get_token_position("l", "hello") == 2 and model.get_token_position("l", "hello", mode="last") == 3
    torch.testing.assert_close(model.tokens_to_residual_directions("a"), model.W_U[:, ord("a") + 3])
    assert model.tokens_to_residual_directions(torch.tensor([[5, 6]])).shape == (1, 2, model.cfg.d_model)
    assert model.to_str_tokens(["ab", "c"]) == [["a", "b", "</s>"], ["c", "</s>"]]
    assert model.to_str_tokens(model.to_tokens(["ab", "c"])[0]) == [["a", "b", "</s>"], ["c", "</s>", "<pad>"]]
    assert torch.equal(model.accumulated_bias(1), torch.zeros(model.cfg.d_model))
    # loss_fn against HF's loss
    hooked = hooked_from(hf)
    tokens, mask, dec, _ = random_batch(128, 2, 6, 4)
    labels = dec.clone()
    labels[1, -1] = -100
    with torch.no_grad():
        logits = hooked(tokens, None, "logits", mask, labels=labels)
        ref = hf(input_ids=tokens, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(hooked.loss_fn(logits, labels), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(utils.lm_cross_entropy_loss(logits, labels), ref, atol=1e-5, rtol=0)
    per_token = hooked.loss_fn(logits, labels, per_token=True)
    assert per_token.shape == labels.shape and per_token[1, -1] == 0


def test_all_composition_scores(hf):
    model = hooked_from(hf)
    L = model.cfg.n_layers + model.cfg.n_decoder_layers
    H = model.cfg.n_heads
    for mode in "QKV":
        scores = model.all_composition_scores(mode)
        assert scores.shape == (L, H, L, H)
    scores = model.all_composition_scores("V")
    # encoder layer 0 head 1 -> encoder layer 1 head 3: |OV_a OV_b|_F / (|OV_a|_F |OV_b|_F)
    a, b = model.OV.AB[0, 1], model.OV.AB[1, 3]
    torch.testing.assert_close(scores[0, 1, 1, 3], (a @ b).norm() / (a.norm() * b.norm()), atol=1e-5, rtol=1e-4)
    assert scores[1, 0, 0, 0] == 0 and scores[0, 0, model.cfg.n_layers, 0] == 0  # later layer / other stack
    q = model.all_composition_scores("K")
    a, b = model.OV.AB[0, 2], model.QK.AB[1, 0].T
    torch.testing.assert_close(q[0, 2, 1, 0], (a @ b).norm() / (a.norm() * b.norm()), atol=1e-5, rtol=1e-4)
    # encoder heads -> cross-attention keys / values (through the encoder output they read)
    cross_k = model.all_composition_scores("K", attn="cross")
    assert cross_k.shape == (model.cfg.n_layers, H, model.cfg.n_decoder_layers, H) and (cross_k > 0).all()
    a, b = model.OV.AB[2, 1], model.QK_cross.AB[1, 2].T
    torch.testing.assert_close(cross_k[2, 1, 1, 2], (a @ b).norm() / (a.norm() * b.norm()), atol=1e-5, rtol=1e-4)
    assert model.all_composition_scores("Q", attn="cross").shape == (model.cfg.n_decoder_layers, H) * 2


# ---- t5hooks.utils -------------------------------------------------------------------------------------
def test_utils_of_the_reference(capsys):
    assert utils.get_act_name("pattern", 0) == "decoder.0.attn.hook_pattern"
    assert utils.get_act_name("pattern", 0, "attn") == "decoder.0.attn.hook_pattern"
    assert utils.get_act_name("pattern", 1, "cross") == "decoder.1.cross_attn.hook_pattern"
    assert utils.get_act_name("k6") == "decoder.6.attn.hook_k"
    assert utils.get_act_name("scale4ln1") == "decoder.4.ln1.hook_scale"
    assert utils.get_act_name("scale", layer_type="ln_final") == "decoder_final_ln.hook_scale"
    assert utils.get_act_name("resid_pre", 2, stack="encoder") == "encoder.2.hook_resid_pre"
    assert utils.get_act_name("post", 3, "mlp") == "decoder.3.mlp.hook_post"
    assert utils.to_numpy(torch.ones(2, requires_grad=True)).tolist() == [1.0, 1.0]
    assert utils.to_numpy([1, 2]).tolist() == [1, 2]
    logits = torch.tensor([[[0.0, 2.0], [3.0, 0.0]]])
    assert utils.lm_accuracy(logits, torch.tensor([[1, 1]])) == 0.5
    assert utils.lm_accuracy(logits, torch.tensor([[1, -100]])) == 1.0
    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny")
    rows = utils.test_prompt("hello", "olleh", model, top_k=3)
    assert [r["token"] for r in rows] == list("olleh") and all(r["rank"] == 0 for r in rows)
    assert "rank 0" in capsys.readouterr().out
