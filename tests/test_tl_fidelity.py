"""TransformerLens fidelity: the reference's signatures and semantics, and no silent wrong answers (issue 10).

Numbers are checked against Hugging Face transformers' T5 (tiny random configs) where HF has the quantity;
TransformerLens's own numbers are in test_tl_oracle.py, which runs TransformerLens 3.9 itself.
"""

import inspect
import warnings

import pytest
import torch
from t5_fixtures import hf_t5, hooked_from, random_batch

from t5hooks import HookedEncoderDecoder
from t5hooks.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def hf():
    return hf_t5("t5_v1_1")


@pytest.fixture(scope="module")
def tiny():
    return HookedEncoderDecoder.from_pretrained("t5hooks-tiny")


def fresh(hf, **kwargs):
    return hooked_from(hf, **kwargs)


# ---- the reference's positional order ------------------------------------------------------------------
def test_forward_positional_order_is_the_references(hf):
    model = fresh(hf)
    assert list(inspect.signature(model.forward).parameters)[:4] == [
        "input",
        "decoder_input",
        "return_type",
        "one_zero_attention_mask",
    ]
    # Equal encoder and decoder lengths: a mask in the 4th slot must be the ENCODER mask (HF's attention_mask).
    tokens, mask, dec, _ = random_batch(128, 3, 6, 6)
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=mask, decoder_input_ids=dec).logits
        got = model(tokens, dec, "logits", mask)
        assert model(tokens, dec, None, mask) is None
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    labels = dec.clone()
    with torch.no_grad():
        per_token = model(tokens, None, "loss", mask, labels=labels, loss_per_token=True)
        mean = model(tokens, None, "loss", mask, labels=labels)
        hf_loss = hf(input_ids=tokens, attention_mask=mask, labels=labels).loss
    assert per_token.shape == labels.shape
    torch.testing.assert_close(per_token.mean(), mean)
    torch.testing.assert_close(mean, hf_loss, atol=1e-4, rtol=0)
    with pytest.raises(TypeError):  # decoder_attention_mask and labels are keyword-only
        model(tokens, dec, "logits", mask, mask)


# ---- masking -------------------------------------------------------------------------------------------
FMIN = torch.finfo(torch.float32).min


def test_masked_scores_are_transformer_lens_values_and_fully_masked_rows_give_zero_patterns(hf):
    """Padding keys score finfo(float32).min and causal keys -inf, as TransformerLens 3.9 (test_tl_oracle.py
    compares every score with it); a query with no visible key gets a zero pattern row (not NaN, not uniform)."""
    model = fresh(hf)
    tokens, mask, dec, dec_mask = random_batch(128, 3, 6, 4, pad_decoder=True)
    mask[2] = 0  # an example with no visible encoder token at all
    names = [
        "encoder.0.attn.hook_attn_scores",
        "decoder.0.attn.hook_attn_scores",
        "decoder.0.cross_attn.hook_attn_scores",
        "encoder.0.attn.hook_pattern",
        "decoder.0.cross_attn.hook_pattern",
    ]
    logits, cache = model.run_with_cache(
        tokens, dec, "logits", mask, decoder_attention_mask=dec_mask, names_filter=names + ["decoder.*.hook_z"]
    )
    for name in names[0], names[2]:
        scores = cache[name]
        hidden = ~mask.bool()[:, None, None, :].expand_as(scores)
        assert (scores[hidden] == FMIN).all() and (scores[~hidden] > FMIN).all() and torch.isfinite(scores).all()
    self_scores = cache["decoder.0.attn.hook_attn_scores"]  # [B,H,D,D]: causal -inf; padding (causally visible) min
    after = torch.ones(4, 4, dtype=torch.bool).triu(1)[None, None].expand_as(self_scores)
    padding = ~dec_mask.bool()[:, None, None, :].expand_as(self_scores) & ~after
    assert torch.isneginf(self_scores[after]).all() and (self_scores[padding] == FMIN).all()
    assert torch.isfinite(self_scores[~after & ~padding]).all() and padding.any()
    for name in names[3:]:
        pattern = cache[name]
        assert not pattern.isnan().any()
        assert (pattern[2] == 0).all()  # no visible key: zeros, never NaN or uniform
        torch.testing.assert_close(pattern[:2].sum(-1), torch.ones_like(pattern[:2].sum(-1)))
    assert torch.isfinite(logits).all()
    # The capture path (what compile and ONNX run) gives the same, and gradients stay finite.
    cap = model.capture(names)
    out = cap(tokens, dec, mask, dec_mask)
    for name in names:
        assert torch.equal(out[name], cache[name]), name
    out["logits"].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_backends_agree_on_padding_causal_and_empty_rows(dtype):
    """The reference, SDPA and (interpreted) Triton paths give the same output on a batch with right padding, left
    padding, an example with no visible key, causal masking with a KV-cache offset, and fp16 (where finfo.min
    plus a bias can round to -inf)."""
    from t5hooks.kernels import reference_relbias_attention, relbias_attention
    from t5hooks.kernels.sdpa import sdpa_relbias_attention

    g = torch.Generator().manual_seed(0)
    B, H, Q, K, d = 4, 2, 3, 7, 8
    q, k, v = (torch.randn(B, H, n, d, generator=g).to(dtype) for n in (Q, K, K))
    table = (4 * torch.randn(16, H, generator=g)).to(dtype)
    mask = torch.ones(B, K, dtype=torch.long)
    mask[1, 4:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    mask[3] = 0  # nothing visible
    for causal, offset in [(False, 0), (True, K - Q)]:
        options = dict(bidirectional=not causal, max_distance=20, causal=causal, q_offset=offset)
        ref = reference_relbias_attention(q.double(), k.double(), v.double(), table.double(), key_padding_mask=mask,
                                          **options)  # fmt: skip
        assert (ref[3] == 0).all()
        outs = {
            "reference": reference_relbias_attention(q, k, v, table, key_padding_mask=mask, **options),
            "sdpa": sdpa_relbias_attention(q, k, v, table, key_padding_mask=mask, **options),
            "triton": relbias_attention(
                q, k, v, table, key_padding_mask=mask, backend="triton", num_buckets=16, **options
            ),
        }
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        for name, out in outs.items():
            assert not out.isnan().any(), name
            torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0, msg=f"{name} causal={causal}")


@pytest.mark.slow
def test_masking_compiled_and_onnx_agree_with_eager(hf, tmp_path):
    """One compiled capture (Dynamo + AOTAutograd, no inductor codegen) and one ONNX graph, against eager:
    - with masks, on a batch with a fully masked example: the same finfo.min / -inf scores and zero pattern rows;
    - without a mask, on a right-padded-looking batch: every token attended, as eagerly, and a warning on every
      call (the compiled graph cannot check: the capture module's eager entry does). OnnxGenerator: in
      test_onnx_generation.py, which shares its export."""
    from t5hooks.export import OnnxRunner, to_onnx

    model = fresh(hf)
    tokens, mask, dec, dec_mask = random_batch(128, 3, 6, 4, pad_decoder=True)
    mask[2] = 0
    names = ["encoder.0.attn.hook_attn_scores", "decoder.0.attn.hook_attn_scores", "decoder.0.cross_attn.hook_pattern"]
    compiled = torch.compile(model.capture(names), backend="aot_eager", fullgraph=True)
    runner = OnnxRunner(to_onnx(model, tmp_path / "m.onnx", capture=names))
    with torch.no_grad():
        eager = model.capture(names)(tokens, dec, mask, dec_mask)
        got = compiled(tokens, dec, mask, dec_mask)
    ort = runner(input=tokens, decoder_input=dec, one_zero_attention_mask=mask, decoder_attention_mask=dec_mask)
    for key in ["logits", *names]:
        torch.testing.assert_close(got[key], eager[key], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.as_tensor(ort[key]), eager[key], atol=1e-4, rtol=0)
    for name in names[:2]:  # the hidden entries are the same values on every path
        hidden = (eager[name] == FMIN) | torch.isneginf(eager[name])
        assert hidden.any()
        assert torch.equal(got[name][hidden], eager[name][hidden])
        assert torch.equal(torch.as_tensor(ort[name])[hidden], eager[name][hidden])
    assert (eager["decoder.0.cross_attn.hook_pattern"][2] == 0).all()

    # No mask: rows 1 and 2 end in EOS then pads, as a tokenizer pads.
    tokens, _, dec, _ = random_batch(128, 3, 7, 4)
    tokens[1, 3], tokens[2, 0] = 1, 1
    with torch.no_grad():
        eager = model.capture(names)(tokens, dec, torch.ones_like(tokens))
    for _ in range(2):
        with pytest.warns(UserWarning, match="right-padded"), torch.no_grad():
            got = compiled(tokens, dec)
        for key in ["logits", names[0]]:
            torch.testing.assert_close(got[key], eager[key], atol=1e-5, rtol=0)
        with pytest.warns(UserWarning, match="right-padded"):
            ort = runner(input=tokens, decoder_input=dec)
        torch.testing.assert_close(torch.as_tensor(ort["logits"]), eager["logits"], atol=1e-4, rtol=0)
    assert not (eager[names[0]] == FMIN).any()  # nothing was masked


def test_no_mask_attends_to_every_token_and_right_padding_warns_on_every_call(tiny):
    """Issue 19 reverses issue 10's pad-id inference: without a mask every token is attended (the reference's
    words, and what TransformerLens 3.9 and Hugging Face do; test_tl_oracle.py compares the numbers), eagerly,
    compiled and in ONNX Runtime. A right-padded-looking batch warns on every call."""
    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny")
    tokens, mask = model.to_tokens(["ab", "abcdefgh"])
    assert model.generate((tokens, mask), max_new_tokens=10, return_type="str") == ["ba", "hgfedcba"]
    for _ in range(2):
        with pytest.warns(UserWarning, match="right-padded"):
            unmasked = model.generate(tokens, max_new_tokens=10, return_type="str")
    assert unmasked != ["ba", "hgfedcba"]  # the pads were attended
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(model(tokens, "x"), model(tokens, "x", "logits", torch.ones_like(tokens)))
    # The decoder never gets an inferred mask: the leading start token and a pad id inside are real tokens.
    dec = torch.tensor([[0, 100, 101, 0, 0], [0, 102, 0, 104, 105]])
    torch.testing.assert_close(
        model((tokens, mask), dec), model((tokens, mask), dec, decoder_attention_mask=torch.ones_like(dec))
    )


def test_text_decoder_input_has_no_eos(tiny):
    model = tiny
    dec = model.to_decoder_tokens("cba")
    assert dec.tolist() == [[0] + [ord(c) + 3 for c in "cba"]]  # start token, the text, no EOS
    logits = model("abcd", "dcb")
    ids = model.to_tokens("abcd")  # the (tokens, mask) pair
    torch.testing.assert_close(logits, model(ids, model.to_decoder_tokens("dcb")))
    assert model.to_str_tokens([int(logits[0, -1].argmax())]) == ["a"]  # continues "dcb" -> "a"


# ---- input hooks -----------------------------------------------------------------------------------------
def test_hook_mlp_in_is_the_pre_norm_residual_only_the_mlp_reads(hf):
    model = fresh(hf)
    tokens, mask, dec, _ = random_batch(128, 2, 5, 3)

    def zero(x, hook):
        return torch.zeros_like(x)

    names = ["decoder.1.hook_resid_mid_cross", "decoder.1.hook_mlp_out", "decoder.1.hook_resid_post"]
    with model.hooks(fwd_hooks=[("decoder.1.hook_mlp_in", zero)]):
        _, cache = model.run_with_cache(tokens, dec, "logits", mask, names_filter=names)
    # MLP of a zero input is zero (no biases); the residual stream itself is not patched.
    assert cache["decoder.1.hook_mlp_out"].abs().max() == 0
    torch.testing.assert_close(cache["decoder.1.hook_resid_post"], cache["decoder.1.hook_resid_mid_cross"])
    _, clean = model.run_with_cache(tokens, dec, "logits", mask, names_filter="*.hook_mlp_in")
    _, mids = model.run_with_cache(tokens, dec, "logits", mask, names_filter="*.hook_resid_mid*")
    torch.testing.assert_close(clean["encoder.0.hook_mlp_in"], mids["encoder.0.hook_resid_mid"])
    torch.testing.assert_close(clean["decoder.0.hook_mlp_in"], mids["decoder.0.hook_resid_mid_cross"])
    model.set_use_hook_mlp_in(False)
    assert not any(n.endswith("hook_mlp_in") for n in model.hook_dict)
    with pytest.raises(ValueError, match="set_use_hook_mlp_in"):
        model.resolve_names("decoder.0.hook_mlp_in")


def test_per_head_input_hooks_self_and_cross_attention(hf):
    model = fresh(hf)
    tokens, mask, dec, _ = random_batch(128, 2, 5, 3)
    other, _, other_dec, _ = random_batch(128, 2, 5, 3, seed=1)
    with torch.no_grad():
        plain = model(tokens, dec, "logits", mask)
    model.set_use_attn_in(True)
    model.set_use_split_qkv_input(True)
    for name in [
        "encoder.0.hook_attn_in",
        "decoder.1.hook_attn_in",
        "decoder.1.hook_cross_attn_in",
        "encoder.1.attn.hook_q_input",
        "decoder.0.attn.hook_v_input",
        "decoder.0.cross_attn.hook_k_input",
    ]:
        assert name in model.hook_dict
    with torch.no_grad():
        logits, clean = model.run_with_cache(tokens, dec, "logits", mask)
        _, corrupt = model.run_with_cache(other, other_dec, "logits", mask)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)  # the switches change no number
    H, d_model = model.cfg.n_heads, model.cfg.d_model
    assert clean["decoder.1.hook_cross_attn_in"].shape == (2, 3, H, d_model)
    assert clean["decoder.0.cross_attn.hook_k_input"].shape == (2, 5, H, d_model)
    head, others = 2, [h for h in range(H) if h != 2]
    # Patching one head's input moves exactly that head's projection (read right after the patch) to the
    # corrupted run's value; the other heads and the other projections stay clean.
    cases = {
        "encoder.1.attn.hook_q_input": ("encoder.1.attn.hook_q", "encoder.1.attn.hook_k"),
        "encoder.0.hook_attn_in": ("encoder.0.attn.hook_v", None),
        "decoder.1.attn.hook_k_input": ("decoder.1.attn.hook_k", "decoder.1.attn.hook_q"),
        "decoder.0.hook_cross_attn_in": ("decoder.0.cross_attn.hook_q", "decoder.0.cross_attn.hook_k"),
        "decoder.0.cross_attn.hook_q_input": ("decoder.0.cross_attn.hook_q", "decoder.0.cross_attn.hook_k"),
        "decoder.0.cross_attn.hook_k_input": ("decoder.0.cross_attn.hook_k", "decoder.0.cross_attn.hook_v"),
        "decoder.1.cross_attn.hook_v_input": ("decoder.1.cross_attn.hook_v", "decoder.1.cross_attn.hook_k"),
    }
    for patched_name, (moved, unmoved) in cases.items():

        def patch_head(x, hook):
            x[:, :, head] = corrupt[hook.name][:, :, head]
            return x

        names = [moved] if unmoved is None else [moved, unmoved]
        with torch.no_grad(), model.hooks(fwd_hooks=[(patched_name, patch_head)]):
            _, patched = model.run_with_cache(tokens, dec, "logits", mask, names_filter=names)
        close = dict(atol=1e-5, rtol=0, msg=patched_name)
        torch.testing.assert_close(patched[moved][:, :, head], corrupt[moved][:, :, head], **close)
        torch.testing.assert_close(patched[moved][:, :, others], clean[moved][:, :, others], **close)
        if unmoved is not None:
            torch.testing.assert_close(patched[unmoved], clean[unmoved], **close)
    # KV-cached generation is unchanged by the switches.
    tokens_out = model.generate(tokens, max_new_tokens=4, one_zero_attention_mask=mask)
    model.set_use_attn_in(False)
    model.set_use_split_qkv_input(False)
    assert torch.equal(tokens_out, model.generate(tokens, max_new_tokens=4, one_zero_attention_mask=mask))


def test_unembed_hook_out_is_the_logits(hf):
    model = fresh(hf)
    tokens, mask, dec, _ = random_batch(128, 2, 5, 3)
    logits, cache = model.run_with_cache(tokens, dec, "logits", mask, names_filter="unembed.hook_out")
    torch.testing.assert_close(cache["unembed.hook_out"], logits)


# ---- caches, tokenizers, dtypes, hook bookkeeping ------------------------------------------------------
def test_logit_attrs_batch_slice_when_batch_equals_positions(hf):
    model = fresh(hf)
    B = D = 4  # batch == positions: a wrong broadcast would go unnoticed
    tokens, mask, dec, _ = random_batch(128, B, 6, D)
    answers = torch.randint(3, 128, (B,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, dec, "logits", mask)
    resid = cache.decompose_resid(stack="decoder")  # [components, B, D, d_model], whole batch (TL semantics)
    for batch_slice in [[1, 3], (0, 2), 2]:
        attrs = cache.logit_attrs(resid, answers, batch_slice=batch_slice)
        rows = torch.arange(B)[slice(*batch_slice) if isinstance(batch_slice, tuple) else batch_slice]
        expected = logits[rows].gather(-1, answers[rows][..., None, None].expand(*logits[rows].shape[:-1], 1))[..., 0]
        torch.testing.assert_close(attrs.sum(0), expected, atol=1e-4, rtol=0)
    # [batch, pos] tokens with a pos slice.
    full = torch.randint(3, 128, (B, D), generator=torch.Generator().manual_seed(4))
    attrs = cache.logit_attrs(resid[:, :, -1], full, pos_slice=-1, batch_slice=[0, 1])
    expected = logits[[0, 1], -1].gather(-1, full[[0, 1], -1][:, None])[:, 0]
    torch.testing.assert_close(attrs.sum(0), expected, atol=1e-4, rtol=0)


def test_tokenizers_kept_or_none(tmp_path, hf):
    class Marker(ByteTokenizer):
        pass

    mine = Marker()
    assert HookedEncoderDecoder.from_pretrained("t5hooks-tiny", tokenizer=mine).tokenizer is mine
    hf.save_pretrained(tmp_path)  # weights and config, no tokenizer files
    assert HookedEncoderDecoder.from_pretrained(str(tmp_path)).tokenizer is None
    model = HookedEncoderDecoder.from_pretrained(str(tmp_path))
    model.set_tokenizer(mine)
    assert model.tokenizer is mine and model.to_tokens("a")[0].tolist() == [[100, 1]]


def test_cfg_dtype_follows_half_and_bfloat16(tiny):
    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny")
    model.half()
    assert model.cfg.dtype == torch.float16
    model.bfloat16()
    assert model.cfg.dtype == torch.bfloat16
    model.to("cpu", False)  # the reference's to(device_or_dtype, print_details)
    model.float()
    assert model.cfg.dtype == torch.float32 and model.cfg.device == "cpu"


def test_hooks_left_by_reset_hooks_end_false_survive_the_next_context(hf):
    model = fresh(hf)
    calls = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: calls.append("left"))], reset_hooks_end=False):
        pass
    with model.hooks(fwd_hooks=[("hook_decoder_embed", lambda x, hook: calls.append("inner"))]):
        pass
    model(torch.tensor([[5, 6]]), torch.tensor([[0]]))
    assert calls == ["left"]
    model.reset_hooks()


def test_beam_step_caches_follow_the_beam_reorder():
    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny-random")  # untrained: beams reorder often
    tokens, mask = model.to_tokens(["abc", "hello", "xyzzy", "beam", "qwerty", "t5", "search", "zz"])
    raw = []  # what each step's decoder really read (without the KV cache: the whole prefix of every beam)
    with model.hooks(fwd_hooks=[("hook_decoder_embed", lambda x, hook: raw.append(x.clone()))]):
        _, steps = model.generate(
            tokens,
            max_new_tokens=5,
            num_beams=3,
            stop_at_eos=False,
            use_past_kv_cache=False,
            one_zero_attention_mask=mask,
            return_cache=True,
            names_filter="hook_decoder_embed",
        )
    # Step t+1 reads the running beams after step t (prefixes of t + 2 tokens). In the post-reorder order, row i
    # of step t is the computation that produced running beam i: its prefix is that beam's first t + 1 tokens.
    for t in range(len(steps) - 1):
        torch.testing.assert_close(steps[t]["hook_decoder_embed"], raw[t + 1][:, : t + 1], msg=f"step {t}")


def test_generate_keywords_of_the_reference(tiny):
    model = tiny
    cached = model.generate("hello", max_new_tokens=8, use_past_kv_cache=True, return_type="tensor")
    recomputed = model.generate("hello", max_new_tokens=8, use_past_kv_cache=False, return_type="tensor")
    assert torch.equal(cached, recomputed)
    beams = [model.generate("hello", max_new_tokens=6, num_beams=2, use_past_kv_cache=c) for c in (True, False)]
    assert beams[0] == beams[1] == "olleh"
    assert model.generate("hello", max_new_tokens=8) == "olleh"  # "input": text in, text out
    assert model.generate("hello", max_new_tokens=8, return_type="str", verbose=True) == "olleh"
    assert model.generate("hello", max_new_tokens=3, stop_at_eos=False, return_type="tensor").shape == (1, 4)
    # eos_token_id: stop at 'l' (its id) instead of </s>
    stopped = model.generate("hello", max_new_tokens=8, eos_token_id=ord("l") + 3, return_type="tensor")
    assert stopped[0, -1].item() == ord("l") + 3
    # freq_penalty (sampling): a huge penalty forbids repeating a token already generated
    sampled = model.generate(
        "aaaa", max_new_tokens=6, do_sample=True, freq_penalty=1e4, seed=0, stop_at_eos=False, return_type="tensor"
    )
    assert len(set(sampled[0].tolist())) == sampled.shape[1]


@pytest.mark.slow
def test_compiled_capture_is_one_graph_when_the_first_batch_has_equal_lengths(hf):
    """Duck sizing would tie E and D when the first batch has E == D; the capture module marks each axis dynamic
    with its own symbol, so (E == D) then (E != D) is still one graph (backend "eager": Dynamo only, cheap)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = fresh(hf)
    cap = model.capture(["decoder.0.hook_resid_post"])
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(cap, backend="eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for E, D in [(5, 5), (7, 3), (4, 9)]:
            tokens, mask, dec, _ = random_batch(128, 2, E, D)
            out = step(tokens, dec, mask)
            torch.testing.assert_close(out["logits"], cap(tokens, dec, mask)["logits"])
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
