"""TransformerLens 3.9 itself as the oracle (issue 19).

Both libraries load the same random T5 v1.0 checkpoint from disk (TransformerLens's `HookedEncoderDecoder` loads
v1.0-style T5; with transformers 5.x its loader needs `n_positions` in `config.json`, which t5hooks reads as the
tokenizer's truncation length, TransformerLens's `n_ctx`) and the same sentencepiece-style tokenizer, and every
comparison runs TransformerLens's code on the same inputs: padded batches with and without a mask, equal and
unequal encoder / decoder lengths.

Where TransformerLens crashes on T5 (`use_split_qkv_input`, `use_attn_in`, the `ActivationCache` helpers that
assume `blocks.{l}`, `to_str_tokens` of text), the test says so (asserting the crash, so a TransformerLens that
starts to work is noticed) and compares t5hooks against the math instead. Deliberate differences are pinned here
against TransformerLens's own numbers and listed in the README's "What differs from TransformerLens".
"""

import contextlib
import importlib.metadata
import inspect
import io
import json
import logging
import warnings

import pytest
import torch
from t5_fixtures import hf_t5, sentencepiece_tokenizer
from transformers import T5ForConditionalGeneration

from t5hooks import HookedEncoderDecoder, utils
from t5hooks.generation import SamplingConfig, choose_token, generate

transformer_lens = pytest.importorskip("transformer_lens")  # CI requires it (conftest REFERENCE_PACKAGES)
from transformer_lens import HookedEncoderDecoder as TLEncoderDecoder  # noqa: E402
from transformer_lens import HookedTransformer  # noqa: E402

N_CTX = 24  # `n_positions`: TransformerLens's n_ctx, the length `to_tokens` truncates to
FMIN = torch.finfo(torch.float32).min
EOS, PAD = 1, 0
# What t5hooks caches beyond TransformerLens: its own decoder-embedding, encoder-output and position-bias points
# (TransformerLens's `rel_pos_hook` exists but never fires).
OURS_ONLY = {"hook_decoder_embed", "hook_encoder_out", "encoder.0.attn.rel_pos_hook", "decoder.0.attn.rel_pos_hook"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5_v1_0")
    hf_t5("t5_v1_0").save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["n_positions"] = N_CTX
    (path / "config.json").write_text(json.dumps(config))
    sentencepiece_tokenizer().save_pretrained(path)
    return path


_TL_HOOK_NAMES: set[str] = set()


def load_tl(path):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", DeprecationWarning)
        logging.disable(logging.WARNING)  # "T5 support is experimental" and the like
        try:
            # TransformerLens's loader reads T5 weights only from a live model (from disk it asks for a causal LM)
            hf_model = T5ForConditionalGeneration.from_pretrained(path)
            model = TLEncoderDecoder.from_pretrained(str(path), hf_model=hf_model)
        finally:
            logging.disable(logging.NOTSET)
    # Optional hook points on in both libraries, so every one of them is compared (hook_mlp_in is off by default
    # in TransformerLens, on here: README).
    assert not model.cfg.use_hook_mlp_in and not model.cfg.use_attn_result
    model.cfg.use_attn_result = True
    model.cfg.use_hook_mlp_in = True
    _TL_HOOK_NAMES.update(model.hook_dict)
    return model.eval()


@pytest.fixture(scope="module")
def tl(checkpoint):
    version = importlib.metadata.version("transformer-lens")
    assert version.startswith("3.9."), f"the oracle is TransformerLens 3.9, found {version}"
    return load_tl(checkpoint)


@pytest.fixture(scope="module")
def ours(checkpoint):
    return HookedEncoderDecoder.from_pretrained(str(checkpoint), use_attn_result=True)


def padded_batch(enc_len, dec_len, seed=0, batch=3):
    """A tokenizer-shaped batch: row r has `enc_len - 2r - 1` random ids, EOS, then pads; the decoder rows start
    with the start token and contain the pad id inside the sequence (a generated 0 is a real token)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((batch, enc_len), PAD)
    mask = torch.zeros(batch, enc_len, dtype=torch.long)
    for row in range(batch):
        n = max(1, enc_len - 2 * row - 1)
        tokens[row, :n] = torch.randint(3, 128, (n,), generator=g)
        tokens[row, n] = EOS
        mask[row, : n + 1] = 1
    dec = torch.randint(3, 128, (batch, dec_len), generator=g)
    dec[:, 0] = 0  # the decoder start token is the pad id
    if dec_len > 2:
        dec[0, dec_len // 2] = PAD
    return tokens, mask, dec


def run_tl(tl, *args, **kwargs):
    with torch.no_grad():
        logging.disable(logging.WARNING)  # "No attention mask provided" on every call without one
        try:
            return tl.run_with_cache(*args, **kwargs)
        finally:
            logging.disable(logging.NOTSET)


def assert_same_activation(ours, ref, name):
    """Value-equal where TransformerLens hides a score (`-inf` causal, `finfo.min` padding), close elsewhere."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (name, ours.shape, ref.shape)
    hidden = torch.isneginf(ref) | (ref == FMIN)
    assert torch.equal(ours[hidden], ref[hidden]), f"{name}: masked entries differ"
    torch.testing.assert_close(ours[~hidden], ref[~hidden], atol=2e-5, rtol=0, msg=name)


def assert_caches_match(cache, ref_cache):
    assert set(cache) - set(ref_cache) == OURS_ONLY
    assert not set(ref_cache) - set(cache)
    assert "encoder.0.attn.rel_pos_hook" in _TL_HOOK_NAMES  # TransformerLens has the point; it never fires
    for name, ref in ref_cache.items():
        assert_same_activation(cache[name], ref, name)


# ---- forward, every hook ------------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", [(9, 4), (7, 7)], ids=["unequal", "equal"])
def test_logits_and_every_cached_hook_with_a_mask(tl, ours, lengths):
    tokens, mask, dec = padded_batch(*lengths)
    ref_logits, ref_cache = run_tl(tl, tokens, dec, one_zero_attention_mask=mask)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a masked batch never warns
        logits, cache = ours.run_with_cache(tokens, dec, one_zero_attention_mask=mask)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=0)
    assert_caches_match(cache, ref_cache)
    # Item 4: padding keys score finfo(float32).min (encoder self- and cross-attention), causal keys -inf.
    scores = cache["encoder.1.attn.hook_attn_scores"]
    assert (scores[~mask.bool()[:, None, None, :].expand_as(scores)] == FMIN).all()
    cross = cache["decoder.0.cross_attn.hook_attn_scores"]
    assert (cross[~mask.bool()[:, None, None, :].expand_as(cross)] == FMIN).all()
    causal = cache["decoder.1.attn.hook_attn_scores"]
    assert torch.isneginf(causal[..., 0, 1:]).all() and not torch.isinf(causal).any(-1).all(-1).any()


@pytest.mark.parametrize("lengths", [(9, 4), (7, 7)], ids=["unequal", "equal"])
def test_no_mask_means_every_token_is_attended(tl, ours, lengths):
    """Item 3: without a mask both libraries attend to every token, pads included, in the encoder and the decoder
    (whose input holds the pad id inside a row); t5hooks warns because the batch looks right-padded."""
    tokens, mask, dec = padded_batch(*lengths)
    ref_logits, ref_cache = run_tl(tl, tokens, dec)
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        with torch.no_grad():
            tl(tokens, dec)  # TransformerLens logs (not warns) on every token input without a mask
    finally:
        logging.getLogger().removeHandler(handler)
    assert any("No attention mask provided" in m for m in logged)
    with torch.no_grad(), pytest.warns(UserWarning, match="right-padded"):
        logits, cache = ours.run_with_cache(tokens, dec)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=0)
    assert_caches_match(cache, ref_cache)
    with torch.no_grad():
        masked = ours(tokens, dec, one_zero_attention_mask=mask)
    assert (masked - logits).abs().max() > 0.1  # the batch really is padded: the mask matters


def test_a_padded_looking_batch_warns_on_every_call_and_nothing_else_does(ours, tmp_path):
    tokens, mask, dec = padded_batch(8, 3)
    calls = [
        lambda: ours(tokens, dec),
        lambda: ours.run_with_cache(tokens, dec, names_filter="hook_embed"),
        lambda: ours.capture(["hook_embed"])(tokens, dec),
        lambda: ours.generate(tokens, max_new_tokens=2),
        lambda: ours((tokens, torch.ones_like(tokens)), dec),  # a mask given (all ones): no warning
    ]
    for expected, call in zip([1, 1, 1, 1, 0], calls):
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            call()
            call()  # every call warns: never once per model
        shown = [w for w in caught if "right-padded" in str(w.message)]
        assert len(shown) == 2 * expected, caught
        assert all(w.filename == __file__ for w in shown)  # at the caller's line
    # Random ids that contain the pad id but are not EOS-then-pads, and unpadded rows: no warning.
    plain = torch.tensor([[5, 0, 7, 1], [0, 0, 9, 1]])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        ours(plain, dec[:2])
        ours(torch.tensor([[5, 6, 0, 0]]), dec[:1])  # pads but no EOS before them


# ---- input forms ------------------------------------------------------------------------------------------------
PROMPTS = ["hello world.", "the cat sat on the mat , hello"]


def test_to_tokens_returns_tokens_and_mask_as_transformer_lens(tl, ours):
    """Item 2: `to_tokens` is `(tokens, attention_mask)`; with two prompts, unpacking gives tokens and mask."""
    ref_tokens, ref_mask = tl.to_tokens(PROMPTS)
    tokens, mask = ours.to_tokens(PROMPTS)
    assert torch.equal(tokens, ref_tokens) and torch.equal(mask, ref_mask)
    assert mask.dtype == ref_mask.dtype and mask[0].sum() < mask.shape[1]  # row 0 is padded
    one = ours.to_tokens("hello")
    assert isinstance(one, tuple) and all(torch.equal(a, b) for a, b in zip(one, tl.to_tokens("hello")))
    long_text = " ".join(["the cat sat on the mat"] * 10)  # longer than n_ctx: truncated by both
    for truncate in (True, False):
        ref = tl.to_tokens(long_text, truncate=truncate)
        got = ours.to_tokens(long_text, truncate=truncate)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert ours.to_tokens(long_text)[0].shape[1] == N_CTX
    assert ours.to_tokens(long_text, move_to_device=False)[0].device.type == "cpu"


def test_the_pair_is_accepted_wherever_tokens_are(tl, ours):
    """`model(model.to_tokens(x), ...)`: forward, run_with_cache, run_with_hooks, generate and capture take the
    pair; text input gives the same logits as TransformerLens's text input (start token as decoder input)."""
    pair = ours.to_tokens(PROMPTS)
    tokens, mask = pair
    dec = torch.tensor([[0, 5, 9], [0, 7, 7]])
    with torch.no_grad():
        ref = tl(tokens, dec, one_zero_attention_mask=mask)
        torch.testing.assert_close(ours(pair, dec), ref, atol=2e-5, rtol=0)
        torch.testing.assert_close(ours.run_with_cache(pair, dec)[0], ref, atol=2e-5, rtol=0)
        torch.testing.assert_close(ours.run_with_hooks(pair, dec), ref, atol=2e-5, rtol=0)
        torch.testing.assert_close(ours.capture([])(pair, dec)["logits"], ref, atol=2e-5, rtol=0)
        torch.testing.assert_close(ours(PROMPTS), tl(PROMPTS), atol=2e-5, rtol=0)
        assert ours(pair, dec, None) is None and tl(tokens, dec, None, mask) is None  # return_type=None
        # the decoder input takes a pair too (its mask is the decoder_attention_mask)
        dec_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
        torch.testing.assert_close(ours(pair, (dec, dec_mask)), ours(pair, dec, decoder_attention_mask=dec_mask))
    assert torch.equal(
        ours.generate(pair, max_new_tokens=3, stop_at_eos=False),
        ours.generate(tokens, max_new_tokens=3, one_zero_attention_mask=mask, stop_at_eos=False),
    )
    with pytest.raises(ValueError, match="mask"):  # the pair's mask and another one: ambiguous
        ours(pair, dec, one_zero_attention_mask=mask)


def test_to_string_and_to_str_tokens_as_transformer_lens(tl, ours):
    """TransformerLens's HookedEncoderDecoder has no to_string / to_str_tokens: the reference is its
    HookedTransformer's (decode without cleaning up spaces; one token at a time), run on the same tokenizer."""
    tokens, _ = ours.to_tokens(PROMPTS)
    assert ours.to_string(tokens) == HookedTransformer.to_string(tl, tokens)
    assert ours.to_string(tokens[1]) == HookedTransformer.to_string(tl, tokens[1])
    assert ours.to_string(tokens[1].tolist()) == HookedTransformer.to_string(tl, tokens[1].tolist())
    assert "mat , hello" in ours.to_string(tokens[1])  # the tokenizer would clean this up to "mat, hello"
    assert ours.to_str_tokens(tokens[1]) == HookedTransformer.to_str_tokens(tl, tokens[1])
    assert ours.to_str_tokens(tokens[1:]) == HookedTransformer.to_str_tokens(tl, tokens[1:])
    # TransformerLens's to_str_tokens of text crashes on T5 (its to_tokens returns a pair): compare with the tokens.
    with pytest.raises(TypeError):
        HookedTransformer.to_str_tokens(tl, PROMPTS[1])
    assert ours.to_str_tokens(PROMPTS[1]) == HookedTransformer.to_str_tokens(tl, tokens[1])
    assert ours.to_str_tokens(PROMPTS) == [ours.to_str_tokens(p) for p in PROMPTS]


# ---- hooks ------------------------------------------------------------------------------------------------------
def zero_head(head):
    def hook(x, hook):
        x = x.clone()
        x[:, :, head] = 0
        return x

    return hook


def test_run_with_hooks_ablations_match(tl, ours):
    tokens, mask, dec = padded_batch(9, 5)
    pattern_hook = lambda x, hook: x * 0.5  # noqa: E731 - a pattern edit: z reads the edited pattern
    scores_hook = lambda x, hook: x.masked_fill(torch.ones_like(x, dtype=torch.bool).triu(1), FMIN)  # noqa: E731
    hooks = [
        ("encoder.1.attn.hook_z", zero_head(1)),
        ("decoder.0.cross_attn.hook_v", zero_head(2)),
        ("decoder.1.cross_attn.hook_pattern", pattern_hook),
        ("encoder.0.attn.hook_attn_scores", scores_hook),
        ("hook_embed", lambda x, hook: x * 1.5),
        (lambda name: name.endswith("mlp.hook_post"), lambda x, hook: x.clamp(max=0.05)),
        ("unembed.hook_in", lambda x, hook: x + 0.01),
    ]
    with torch.no_grad():
        logging.disable(logging.WARNING)
        try:
            ref = tl.run_with_hooks(tokens, dec, one_zero_attention_mask=mask, fwd_hooks=hooks)
        finally:
            logging.disable(logging.NOTSET)
        got = ours.run_with_hooks(tokens, dec, one_zero_attention_mask=mask, fwd_hooks=hooks)
        clean = ours(tokens, dec, one_zero_attention_mask=mask)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    assert (got - clean).abs().max() > 0.1


def test_hook_mlp_in_feeds_only_the_mlp_unlike_transformer_lens_t5(tl, ours):
    """Deliberate difference (README): in TransformerLens's T5 block a patch of `hook_mlp_in` also replaces the
    residual stream (`resid_post = mlp_in + mlp_out`); here, as in TransformerLens's HookedTransformer blocks,
    only the MLP reads it."""
    tokens, mask, dec = padded_batch(7, 4)
    zero = [("decoder.1.hook_mlp_in", lambda x, hook: torch.zeros_like(x))]
    names = ["decoder.1.hook_resid_mid_cross", "decoder.1.hook_mlp_out", "decoder.1.hook_resid_post"]
    logging.disable(logging.WARNING)
    try:
        with torch.no_grad(), tl.hooks(fwd_hooks=zero):
            _, ref = tl.run_with_cache(tokens, dec, one_zero_attention_mask=mask, names_filter=names)
    finally:
        logging.disable(logging.NOTSET)
    with torch.no_grad(), ours.hooks(fwd_hooks=zero):
        _, got = ours.run_with_cache(tokens, dec, one_zero_attention_mask=mask, names_filter=names)
    assert ref["decoder.1.hook_mlp_out"].abs().max() == 0 == got["decoder.1.hook_mlp_out"].abs().max()
    assert ref["decoder.1.hook_resid_post"].abs().max() == 0  # TransformerLens: the residual was replaced
    assert_same_activation(got["decoder.1.hook_resid_post"], ref["decoder.1.hook_resid_mid_cross"], "resid_post")


def test_loss_decoder_text_and_fold_ln_where_transformer_lens_has_none(checkpoint, tl, ours):
    """Deliberate additions (README): TransformerLens's T5 silently returns logits for `return_type="loss"`, crashes
    on decoder text and on `fold_ln=True`; here the loss is the cross-entropy of TransformerLens's own logits with
    label i at position i, decoder text is the start token plus the text, and folding changes no logit."""
    tokens, mask, dec = padded_batch(7, 4)
    labels = torch.randint(3, 128, dec.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logging.disable(logging.WARNING)
        try:
            ref_logits = tl(tokens, dec, "loss", mask)
            with pytest.raises(TypeError):
                tl(PROMPTS, "hello")
        finally:
            logging.disable(logging.NOTSET)
        assert ref_logits.shape == (*dec.shape, ours.cfg.d_vocab)  # logits, not a loss
        loss = ours(tokens, dec, "loss", mask, labels=labels)
        expected = torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), labels.flatten())
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
        text_dec = ours.to_decoder_tokens(["hello", "hello"])
        assert text_dec[0, 0] == 0 and EOS not in text_dec.tolist()[0]
        pair = ours.to_tokens(PROMPTS)
        ref_text = tl(pair[0], text_dec, one_zero_attention_mask=pair[1])
        torch.testing.assert_close(ours(PROMPTS, ["hello", "hello"]), ref_text, atol=2e-5, rtol=0)
    with pytest.raises(TypeError, match="fold_ln"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        TLEncoderDecoder.from_pretrained(
            str(checkpoint), hf_model=T5ForConditionalGeneration.from_pretrained(checkpoint), fold_ln=True
        )
    folded = HookedEncoderDecoder.from_pretrained(str(checkpoint), fold_ln=True)
    with torch.no_grad():
        ref = tl(tokens, dec, one_zero_attention_mask=mask)
        torch.testing.assert_close(folded(tokens, dec, one_zero_attention_mask=mask), ref, atol=2e-5, rtol=0)


def test_backward_hooks_and_gradients_match(tl, ours):
    tokens, mask, dec = padded_batch(8, 4)
    targets = torch.randint(3, 128, dec.shape, generator=torch.Generator().manual_seed(5))
    names = ["hook_embed", "encoder.1.attn.hook_pattern", "decoder.0.cross_attn.hook_z", "unembed.hook_in"]

    def run(model):
        grads = {}

        def save(x, hook):
            grads[hook.name] = x.detach().clone()

        halve = ("decoder.1.hook_resid_mid", lambda g, hook: g * 0.5)  # a gradient edit flows upstream
        model.zero_grad()
        with model.hooks(bwd_hooks=[(n, save) for n in names] + [halve]):
            logits = model(tokens, dec, one_zero_attention_mask=mask)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        mlp = model.encoder[1].mlp  # a weight gradient, [d_model, d_mlp] (not W_E: TransformerLens unties it)
        return grads, (mlp.W_in.grad if model is tl else mlp.in_proj.grad.T).clone()

    ref_grads, ref_wgrad = run(tl)
    grads, wgrad = run(ours)
    assert set(grads) == set(names)
    for name in names:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    torch.testing.assert_close(wgrad, ref_wgrad, atol=1e-6, rtol=1e-4)
    ours.zero_grad()
    tl.zero_grad()
    # run_with_cache(incl_bwd=True): TransformerLens's T5 returns only logits, so its incl_bwd crashes (backward
    # of a non-scalar); t5hooks' loss output gives the same gradients TransformerLens's hooks saw for that loss.
    with pytest.raises(RuntimeError, match="scalar"):
        tl.run_with_cache(tokens, dec, one_zero_attention_mask=mask, incl_bwd=True, names_filter=names)
    labels = targets
    _, cache = ours.run_with_cache(
        tokens, dec, "loss", mask, labels=labels, incl_bwd=True, names_filter=names[:3] + ["unembed.hook_in"]
    )
    # same loss, but without the gradient-halving hook: compare the points downstream of it
    torch.testing.assert_close(cache["unembed.hook_in_grad"], ref_grads["unembed.hook_in"], atol=1e-6, rtol=1e-4)
    ours.zero_grad()


def test_hook_api_details_match(tl, ours):
    """Order of prepended hooks, permanent hooks, names_filter forms, remove_batch_dim, nested contexts."""
    tokens, mask, dec = padded_batch(6, 3, batch=1)

    def order_of(model):
        calls = []
        model.add_hook("hook_embed", lambda x, hook: calls.append("a"))
        model.add_hook("hook_embed", lambda x, hook: calls.append("b"), prepend=True)
        model.add_hook("hook_embed", lambda x, hook: calls.append("perm"), is_permanent=True)
        model.hook_dict["hook_embed"].add_perma_hook(lambda x, hook: calls.append("point-perm"))
        model.add_perma_hook("encoder.0.hook_resid_pre", lambda x, hook: calls.append("model-perm"))
        model.add_hook(lambda name: name.endswith("hook_z"), lambda g, hook: None, dir="bwd")
        listed = [
            {name: len(handles) for name, handles in model.list_hooks(**kwargs).items()}
            for kwargs in [{}, {"dir": "bwd"}, {"including_permanent": False}, {"name_filter": "hook_embed"}]
        ]
        with torch.no_grad():
            model(tokens, dec, one_zero_attention_mask=mask)
        model.reset_hooks()  # permanent hooks survive
        with torch.no_grad():
            model(tokens, dec, one_zero_attention_mask=mask)
        hp = model.hook_dict["hook_embed"]
        state = (hp.has_hooks(), hp.has_hooks(dir="bwd"), hp.has_hooks(including_permanent=False))
        model.reset_hooks(including_permanent=True)
        with torch.no_grad():
            model(tokens, dec, one_zero_attention_mask=mask)
        return calls, state, listed

    assert order_of(ours) == order_of(tl)
    for names_filter in [None, "encoder.1.hook_resid_post", ["hook_embed", "decoder.0.attn.hook_q"]]:
        for f in [names_filter, (lambda n: "mlp" in n) if names_filter is None else names_filter]:
            _, ref = run_tl(tl, tokens, dec, one_zero_attention_mask=mask, names_filter=f, remove_batch_dim=True)
            with torch.no_grad():
                _, got = ours.run_with_cache(
                    tokens, dec, one_zero_attention_mask=mask, names_filter=f, remove_batch_dim=True
                )
            assert set(ref) <= set(got) and set(got) - set(ref) <= OURS_ONLY
            for name in ref:
                assert_same_activation(got[name], ref[name], name)
    # pos_slice: an int keeps a position axis of size 1 in both libraries; ranges and lists as slices.
    for pos_slice in [-1, (1, 3), [0, 2]]:
        _, ref = run_tl(tl, tokens, dec, one_zero_attention_mask=mask, pos_slice=pos_slice)
        with torch.no_grad():
            _, got = ours.run_with_cache(tokens, dec, one_zero_attention_mask=mask, pos_slice=pos_slice)
        for name in ref:
            assert_same_activation(got[name], ref[name], name)
    assert got["hook_embed"].shape == ref["hook_embed"].shape == (1, 2, ours.cfg.d_model)


def test_hooks_left_by_a_context_differ_from_transformer_lens(tl, ours):
    """Deliberate difference (README): hooks a `hooks(reset_hooks_end=False)` context leaves behind stay until
    `reset_hooks()`; TransformerLens removes them when the next context at the same nesting depth exits."""
    tokens, mask, dec = padded_batch(6, 3, batch=1)

    def survivors(model):
        calls = []
        with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: calls.append("left"))], reset_hooks_end=False):
            pass
        with model.hooks(fwd_hooks=[("encoder.0.hook_resid_pre", lambda x, hook: calls.append("inner"))]):
            pass
        with torch.no_grad():
            model(tokens, dec, one_zero_attention_mask=mask)
        model.reset_hooks()
        return calls

    assert survivors(tl) == [] and survivors(ours) == ["left"]


# ---- generation -------------------------------------------------------------------------------------------------
def tl_generate(tl, *args, **kwargs):
    logging.disable(logging.WARNING)
    try:
        return tl.generate(*args, verbose=False, **kwargs)
    finally:
        logging.disable(logging.NOTSET)


def upto_eos(tokens, stops):
    """Each row up to and including its first stop token (what both libraries agree on; after it TransformerLens
    repeats EOS and t5hooks pads, as Hugging Face)."""
    rows = []
    for row in tokens.tolist():
        cut = next((i for i, t in enumerate(row) if i > 0 and t in stops), len(row) - 1)
        rows.append(row[: cut + 1])
    return rows


def test_generate_matches_greedy_sampled_and_eos_int_and_list(tl, ours):
    tokens, mask, _ = padded_batch(9, 1)
    greedy = tl_generate(tl, tokens, one_zero_attention_mask=mask, max_new_tokens=8, do_sample=False)
    ours_greedy = ours.generate(tokens, max_new_tokens=8, one_zero_attention_mask=mask)
    assert torch.equal(ours_greedy, greedy)
    top1 = tl_generate(tl, tokens, one_zero_attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=1)
    ours_top1 = ours.generate(tokens, max_new_tokens=8, one_zero_attention_mask=mask, do_sample=True, top_k=1)
    assert torch.equal(ours_top1, top1) and torch.equal(top1, greedy)
    # Stop tokens the model does produce, so rows stop at different steps.
    a, b = int(greedy[0, 3]), int(greedy[2, 5])
    for eos in (a, [a], [a, b], (b, a)):
        ref = tl_generate(tl, tokens, one_zero_attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos)
        got = ours.generate(tokens, max_new_tokens=8, one_zero_attention_mask=mask, eos_token_id=eos)
        stops = {eos} if isinstance(eos, int) else set(eos)
        assert upto_eos(got, stops) == upto_eos(ref, stops), eos
        assert got.shape == ref.shape, eos  # both stop when every row has stopped
        if eos == [a, b]:  # sampled (top_k=1) with a list of stop ids
            sampled = dict(one_zero_attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=1, eos_token_id=eos)
            ref_s, got_s = tl_generate(tl, tokens, **sampled), ours.generate(tokens, **sampled)
            assert upto_eos(got_s, stops) == upto_eos(ref_s, stops) == upto_eos(ref, stops)
        if isinstance(eos, int):  # after the stop TransformerLens repeats it, t5hooks pads (as Hugging Face)
            stopped = [row for row in upto_eos(ref, stops) if len(row) < ref.shape[1]]
            assert stopped and all(set(ref[i, len(r) :].tolist()) <= {eos} for i, r in enumerate(upto_eos(ref, stops)))
            assert all(set(got[i, len(r) :].tolist()) <= {PAD} for i, r in enumerate(upto_eos(got, stops)))
    # Item 3 in generate: without a mask both attend to the pads (row 2's continuation changes with the mask).
    ref_unmasked = tl_generate(tl, tokens, max_new_tokens=8, do_sample=False)
    with pytest.warns(UserWarning, match="right-padded"):
        ours_unmasked = ours.generate(tokens, max_new_tokens=8)
    assert upto_eos(ours_unmasked, {EOS}) == upto_eos(ref_unmasked, {EOS}) and ours_unmasked.shape == ref_unmasked.shape
    assert not torch.equal(ours_unmasked, ours_greedy)
    # Defaults: TransformerLens samples and shows a progress bar, t5hooks is greedy and quiet (README "What differs").
    assert inspect.signature(tl.generate).parameters["do_sample"].default is True
    assert inspect.signature(generate).parameters["do_sample"].default is False
    assert inspect.signature(tl.generate).parameters["verbose"].default is True
    assert inspect.signature(generate).parameters["verbose"].default is False
    assert inspect.signature(tl.generate).parameters["max_new_tokens"].default == 10
    assert inspect.signature(ours.generate).parameters["max_new_tokens"].default == 10
    # Item 1: a list of EOS ids stops text generation too ("hello" has one row).
    free = ours.generate("hello", max_new_tokens=8, stop_at_eos=False, return_type="tensor")[0].tolist()
    stop = free[3]
    text = ours.generate("hello", max_new_tokens=8, eos_token_id=[stop], return_type="tensor")[0].tolist()
    assert text == free[: free.index(stop, 1) + 1]


def test_sampling_steps_are_transformer_lens_sample_logits():
    """Temperature 0 is argmax; `freq_penalty` lowers the temperature-scaled logits; with both top_k and top_p
    TransformerLens applies only top_k (so t5hooks refuses the pair). Logits chosen so each order of operations
    picks a different token with probability > 1 - 1e-3."""
    from transformer_lens.utilities import sample_logits

    logits = torch.tensor([[10.0, 9.9, -5.0]])
    previous = torch.tensor([[0]])  # token 0 occurred once: penalty 1 after T=0.01 leaves it ahead by 9
    torch.manual_seed(0)
    ref = sample_logits(logits.clone(), temperature=0.01, freq_penalty=1.0, tokens=previous)
    ours = choose_token(logits, SamplingConfig(True, 0.01, freq_penalty=1.0), torch.Generator().manual_seed(0),
                        previous=previous)  # fmt: skip
    assert ref.tolist() == ours.tolist() == [0]
    assert sample_logits(logits.clone(), temperature=0.0).tolist() == [0]
    assert choose_token(logits, SamplingConfig(True, 0.0)).tolist() == [0]
    top_k_only = [int(sample_logits(logits.clone(), top_k=2, top_p=1e-6)) for _ in range(50)]
    assert set(top_k_only) == {0, 1}  # top_p=1e-6 would have kept only token 0: it was dropped
    with pytest.raises(ValueError, match="exclusive"):
        SamplingConfig(True, top_k=2, top_p=0.5).validate()


# ---- model helpers and the cache ----------------------------------------------------------------------------------
def test_weight_views_and_head_labels_match(tl, ours):
    for name in ["W_E", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_out"]:
        torch.testing.assert_close(getattr(ours, name), getattr(tl, name), atol=0, rtol=0, msg=name)
    for name in ["b_in", "b_out"]:
        torch.testing.assert_close(getattr(ours, name), getattr(tl, name), atol=0, rtol=0, msg=name)
    for name in ["QK", "OV"]:
        torch.testing.assert_close(getattr(ours, name).AB, getattr(tl, name).AB, atol=1e-6, rtol=0, msg=name)
    assert ours.all_head_labels() == tl.all_head_labels()  # "EL{l}H{h}" then "DL{l}H{h}"
    # Deliberate difference (README): TransformerLens raises; here None, so tools that walk attributes still work.
    with pytest.raises(NotImplementedError, match="relative"):
        tl.W_pos  # noqa: B018
    assert ours.W_pos is None
    for model in (ours, tl):
        # no dropout in either (README): training mode computes the same numbers
        assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    tokens, mask, dec = padded_batch(6, 3)
    with torch.no_grad():
        ours.train()
        try:
            train_mode = ours(tokens, dec, one_zero_attention_mask=mask)
        finally:
            ours.eval()
        torch.testing.assert_close(train_mode, ours(tokens, dec, one_zero_attention_mask=mask), atol=0, rtol=0)


def test_activation_cache_methods_both_libraries_have(tl, ours):
    tokens, mask, dec = padded_batch(8, 5)
    _, ref = run_tl(tl, tokens, dec, one_zero_attention_mask=mask)
    with torch.no_grad():
        _, cache = ours.run_with_cache(tokens, dec, one_zero_attention_mask=mask)
    assert len(cache) == len(ref) + len(OURS_ONLY)
    assert list(k for k in cache.keys() if k not in OURS_ONLY) == list(ref.keys())
    assert [k for k in cache if k not in OURS_ONLY] == list(ref)
    assert all(torch.equal(a, b) for a, b in zip(cache.values(), [cache[k] for k in cache.keys()]))
    assert dict(cache.items()).keys() == cache.keys()
    assert cache["embed"] is cache["hook_embed"] and torch.equal(ref["embed"], ref["hook_embed"])  # item 6
    # (short name, layer) reads the decoder here; TransformerLens's looks up `blocks.{l}`, absent on its T5
    assert cache["pattern", 1] is cache["decoder.1.attn.hook_pattern"]
    with pytest.raises(KeyError, match="blocks.1.attn.hook_pattern"):
        ref["pattern", 1]
    for batch_slice in [1, (0, 2), [2, 0]]:
        sliced, ref_sliced = cache.apply_slice_to_batch_dim(batch_slice), ref.apply_slice_to_batch_dim(batch_slice)
        assert sliced.has_batch_dim == ref_sliced.has_batch_dim
        for name in ref:
            assert_same_activation(sliced[name], ref_sliced[name], name)
    one, ref_one = cache.apply_slice_to_batch_dim([1]).remove_batch_dim(), ref.apply_slice_to_batch_dim([1])
    ref_one.remove_batch_dim()
    for name in ref:
        assert_same_activation(one[name], ref_one[name], name)
    assert cache.to("cpu") is cache and ref.to("cpu") is ref
    # Helpers TransformerLens's cache runs only on `blocks.{l}` models: on its T5 they crash (pinned), and the
    # t5hooks versions are checked against the math in test_analysis.py / test_tl_api.py and below.
    for method, args in [
        ("accumulated_resid", ()),
        ("decompose_resid", ()),
        ("stack_head_results", ()),
        ("compute_head_results", ()),
        ("get_full_resid_decomposition", ()),
        ("stack_activation", ("resid_pre",)),
        ("get_neuron_results", (0,)),
        ("stack_neuron_results", (1,)),
    ]:
        with pytest.raises(KeyError, match="blocks"):
            getattr(ref, method)(*args)
    with pytest.raises(KeyError, match="ln_final"):  # its final norm is `decoder_final_ln` on T5
        ref.apply_ln_to_stack(cache.decompose_resid())
    for mode in (True, False):  # the same global switch
        for c in (cache, ref):
            c.toggle_autodiff(mode)
            assert torch.is_grad_enabled() is mode
    torch.set_grad_enabled(True)
    with pytest.raises(AttributeError):
        ref.logit_attrs(torch.zeros(1, 3, 5, ours.cfg.d_model), 5)


def test_decoder_head_stack_includes_cross_attention_heads(ours):
    """Item 5: `stack_head_results` on the decoder lists self- and cross-attention heads ("L1H2", "L1H2_cross"),
    so the heads of every layer sum to all of its attention output."""
    tokens, mask, dec = padded_batch(8, 5)
    with torch.no_grad():
        _, cache = ours.run_with_cache(tokens, dec, one_zero_attention_mask=mask)
    heads, labels = cache.stack_head_results(-1, return_labels=True)
    H, L = ours.cfg.n_heads, ours.cfg.n_decoder_layers
    assert len(labels) == heads.shape[0] == 2 * H * L
    assert labels[:H] == [f"L0H{h}" for h in range(H)] and labels[H : 2 * H] == [f"L0H{h}_cross" for h in range(H)]
    total = sum(cache[f"decoder.{l}.hook_attn_out"] + cache[f"decoder.{l}.hook_cross_attn_out"] for l in range(L))
    torch.testing.assert_close(heads.sum(0), total, atol=1e-5, rtol=0)
    self_only, self_labels = cache.stack_head_results(-1, return_labels=True, attn="self")
    assert all(not label.endswith("_cross") for label in self_labels) and self_only.shape[0] == H * L
    # with the remainder, the components sum to the residual stream read at the final norm
    full = cache.stack_head_results(-1, incl_remainder=True)
    torch.testing.assert_close(full.sum(0), cache[f"decoder.{L - 1}.hook_resid_post"], atol=1e-5, rtol=0)
    enc, enc_labels = cache.stack_head_results(-1, return_labels=True, stack="encoder")
    assert enc.shape[0] == H * ours.cfg.n_layers and not any(label.endswith("_cross") for label in enc_labels)


def test_logit_attrs_refuses_encoder_residuals(ours):
    """Item 7: an encoder decomposition has no path to the logits; equal lengths must not slip through."""
    tokens, mask, dec = padded_batch(6, 6)
    with torch.no_grad():
        _, cache = ours.run_with_cache(tokens, dec, one_zero_attention_mask=mask)
    answer = torch.tensor([5, 6, 7])
    for stack_of in [
        cache.decompose_resid(stack="encoder"),
        cache.accumulated_resid(stack="encoder"),
        cache.stack_head_results(stack="encoder"),
        cache.get_full_resid_decomposition(stack="encoder", expand_neurons=False),
    ]:
        with pytest.raises(ValueError, match="encoder"):
            cache.logit_attrs(stack_of, answer)
    unequal_tokens, unequal_mask, unequal_dec = padded_batch(8, 5)
    with torch.no_grad():
        _, other = ours.run_with_cache(unequal_tokens, unequal_dec, one_zero_attention_mask=unequal_mask)
    with pytest.raises(ValueError, match="encoder"):
        other.logit_attrs(other.decompose_resid(stack="encoder")[:, :, :-1], answer)  # sliced: caught by its shape
    # the decoder's decomposition still sums to the logit
    attrs = cache.logit_attrs(cache.decompose_resid(), answer)
    logits = ours(tokens, dec, one_zero_attention_mask=mask)
    torch.testing.assert_close(
        attrs.sum(0), logits[torch.arange(3)[:, None], :, answer[:, None]][:, 0], atol=1e-4, rtol=0
    )


def test_get_act_name_embed_is_transformer_lens_hook_embed(tl):
    """Item 6: TransformerLens's `get_act_name("embed")` is `hook_embed` (its T5's encoder embedding)."""
    from transformer_lens import utilities as tl_utils

    assert (
        utils.get_act_name("embed") == tl_utils.get_act_name("embed") == "hook_embed" and "hook_embed" in tl.hook_dict
    )
    assert utils.get_act_name("embed", stack="decoder") == "hook_decoder_embed"
    assert utils.get_act_name("embed", stack="encoder") == "hook_embed"
    assert utils.get_act_name("decoder_embed") == "hook_decoder_embed"
    # every TransformerLens short name whose full name exists on its T5 resolves the same here
    for short in ["embed", "resid_pre", "attn_out", "mlp_out", "pattern", "scale", "q", "post", "resid_post"]:
        full = tl_utils.get_act_name(short)
        if full in tl.hook_dict:
            assert utils.get_act_name(short) == full


# ---- where TransformerLens itself crashes on T5 ----------------------------------------------------------------
def test_split_qkv_and_attn_in_crash_in_transformer_lens_and_follow_the_math_here(checkpoint, ours):
    """TransformerLens 3.9 crashes on T5 with `use_split_qkv_input` / `use_attn_in` (an einsum on per-head inputs
    in cross-attention). t5hooks: the switches change no number, and the per-head copies are what the math says
    (the residual stream repeated per head, before the norm)."""
    tokens, mask, dec = padded_batch(7, 4)
    for flag in ("use_split_qkv_input", "use_attn_in"):
        model = load_tl(checkpoint)
        setattr(model.cfg, flag, True)
        with pytest.raises(RuntimeError, match="einsum"):
            run_tl(model, tokens, dec, one_zero_attention_mask=mask)
    model = HookedEncoderDecoder.from_pretrained(str(checkpoint))
    with torch.no_grad():
        plain = model(tokens, dec, one_zero_attention_mask=mask)
    model.set_use_split_qkv_input(True)
    model.set_use_attn_in(True)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, dec, one_zero_attention_mask=mask)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    H = model.cfg.n_heads
    per_head = lambda x: x[:, :, None].expand(-1, -1, H, -1)  # noqa: E731
    torch.testing.assert_close(cache["encoder.1.hook_attn_in"], per_head(cache["encoder.1.hook_resid_pre"]))
    torch.testing.assert_close(cache["decoder.0.attn.hook_q_input"], per_head(cache["decoder.0.hook_resid_pre"]))
    torch.testing.assert_close(cache["decoder.1.hook_cross_attn_in"], per_head(cache["decoder.1.hook_resid_mid"]))
    torch.testing.assert_close(cache["decoder.0.cross_attn.hook_k_input"], per_head(cache["hook_encoder_out"]))
    # TransformerLens's names for the split inputs sit on the block; here on the attention module, loudly.
    with pytest.raises(ValueError, match="attn.hook_q_input"):
        model.resolve_names("encoder.0.hook_q_input")


def test_fully_masked_example_gives_zero_patterns_where_transformer_lens_gives_uniform(tl, ours):
    """Deliberate difference (README): an example whose mask is all zeros has no visible key. TransformerLens's
    finfo.min scores make its pattern uniform over the padding; t5hooks gives zeros (never NaN). The scores are
    the same."""
    tokens, mask, dec = padded_batch(6, 3)
    mask[2] = 0
    names = ["encoder.0.attn.hook_attn_scores", "encoder.0.attn.hook_pattern", "decoder.1.cross_attn.hook_pattern"]
    _, ref = run_tl(tl, tokens, dec, one_zero_attention_mask=mask, names_filter=names)
    with torch.no_grad():
        _, got = ours.run_with_cache(tokens, dec, one_zero_attention_mask=mask, names_filter=names)
    assert_same_activation(got[names[0]], ref[names[0]], names[0])
    for name in names[1:]:
        torch.testing.assert_close(ref[name][2], torch.full_like(ref[name][2], 1 / 6))
        assert (got[name][2] == 0).all()
        assert_same_activation(got[name][:2], ref[name][:2], name)
