"""Generation: token-for-token parity with Hugging Face (greedy, beam search), hooks at every step, caches."""

import pytest
import torch
from t5_fixtures import hf_t5, hooked_from, random_batch

from t5hooks import HookedEncoderDecoder
from t5hooks.tokenizer import ByteTokenizer


@pytest.fixture(scope="module", params=["t5_v1_0", "t5_v1_1"])
def pair(request):
    hf = hf_t5(request.param)
    return hf, hooked_from(hf)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_matches_hf_on_padded_batch(pair, num_beams):
    hf, model = pair
    tokens, mask, _, _ = random_batch(model.cfg.d_vocab, 3, 10, 2)
    ref = hf.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=num_beams)
    ours = model.generate(tokens, 12, one_zero_attention_mask=mask, num_beams=num_beams)
    assert torch.equal(ours, ref)


def test_greedy_stops_at_eos_and_pads_like_hf():
    hf = hf_t5("t5_v1_1")
    tokens, mask, _, _ = random_batch(hf.config.vocab_size, 4, 8, 2, seed=3)
    first = hf.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=6, do_sample=False)
    with torch.no_grad():  # EOS (id 1) ties with row 0's third token, and argmax takes the lower id: row 0 stops there
        hf.lm_head.weight[1] = hf.lm_head.weight[int(first[0, 3])]
    model = hooked_from(hf)
    ref = hf.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=30, do_sample=False)
    ours = model.generate(tokens, 30, one_zero_attention_mask=mask)
    assert torch.equal(ours, ref)
    assert ours[0, 3] == 1 and torch.all(ours[0, 4:] == 0)  # stopped at EOS, then padded


def test_a_list_of_eos_ids_stops_greedy_and_beam_search_as_hf(pair):
    """`eos_token_id=[a, b]` (TransformerLens's documented form; test_tl_oracle.py compares greedy with it) stops a
    row at either id, greedy and with beams, where Hugging Face's generate stops. After the stop HF's beam search
    repeats the first stop id; t5hooks pads, as HF's greedy does."""
    hf, model = pair
    tokens, mask, _, _ = random_batch(model.cfg.d_vocab, 3, 10, 2)
    free = model.generate(tokens, 10, one_zero_attention_mask=mask, num_beams=3, stop_at_eos=False)
    generated = [t for t in free[:, 1:].flatten().tolist() if t > 1]
    stops = [generated[0], generated[len(generated) // 2]]
    for num_beams in (1, 3):
        ref = hf.generate(
            input_ids=tokens, attention_mask=mask, max_new_tokens=10, do_sample=False, num_beams=num_beams,
            eos_token_id=stops,
        )  # fmt: skip
        ours = model.generate(tokens, 10, one_zero_attention_mask=mask, num_beams=num_beams, eos_token_id=stops)
        assert ours.shape == ref.shape
        for row, ref_row in zip(ours.tolist(), ref.tolist()):
            end = next((i for i, t in enumerate(ref_row) if i > 0 and t in stops), len(ref_row) - 1)
            assert row[: end + 1] == ref_row[: end + 1] and set(row[end + 1 :]) <= {0}
        one = model.generate(tokens, 10, one_zero_attention_mask=mask, num_beams=num_beams, eos_token_id=stops[:1])
        assert torch.equal(one, model.generate(tokens, 10, one_zero_attention_mask=mask, num_beams=num_beams,
                                               eos_token_id=stops[0]))  # fmt: skip
    with pytest.raises(ValueError, match="vocabulary"):
        model.generate(tokens, 2, one_zero_attention_mask=mask, eos_token_id=[1, model.cfg.d_vocab])
    with pytest.raises(TypeError, match="eos_token_id"):
        model.generate(tokens, 2, one_zero_attention_mask=mask, eos_token_id=[])


def test_kv_cache_decoding_equals_full_recompute(pair):
    _, model = pair
    tokens, mask, _, _ = random_batch(model.cfg.d_vocab, 2, 9, 2)
    out = model.generate(tokens, 8, one_zero_attention_mask=mask, stop_at_eos=False)
    with torch.no_grad():
        logits = model(tokens, out[:, :-1], one_zero_attention_mask=mask)
    assert torch.equal(logits.argmax(-1), out[:, 1:])


def test_hooks_fire_at_every_step_and_steer(pair):
    _, model = pair
    tokens, mask, _, _ = random_batch(model.cfg.d_vocab, 2, 9, 2)
    calls = []
    with model.hooks(fwd_hooks=[("decoder.0.hook_resid_pre", lambda x, hook: calls.append(x.shape[1]))]):
        out = model.generate(tokens, 6, one_zero_attention_mask=mask, stop_at_eos=False)
    assert calls == [1] * 6  # one position per step (KV cache)
    plain = model.generate(tokens, 6, one_zero_attention_mask=mask, stop_at_eos=False)
    assert torch.equal(out, plain)
    steer = 50 * model.W_U[:, 7]  # push every step towards token 7
    with model.hooks(fwd_hooks=[("decoder.0.hook_resid_post", lambda x, hook: x + steer)]):
        steered = model.generate(tokens, 6, one_zero_attention_mask=mask, stop_at_eos=False)
    assert (steered[:, 1:] == 7).float().mean() > 0.9


def test_return_cache_gives_every_step(pair):
    _, model = pair
    tokens, mask, _, _ = random_batch(model.cfg.d_vocab, 2, 9, 2)
    out, steps = model.generate(
        tokens,
        5,
        one_zero_attention_mask=mask,
        stop_at_eos=False,
        return_cache=True,
        names_filter=["hook_encoder_out", "decoder.*.hook_resid_post", "decoder.0.attn.hook_pattern"],
    )
    assert len(steps) == 5
    assert "hook_encoder_out" in steps[0] and "hook_encoder_out" not in steps[1]
    for t, step in enumerate(steps):
        assert step["decoder.0.attn.hook_pattern"].shape == (2, model.cfg.n_heads, 1, t + 1)
    # the last step's residual equals the full-sequence run's at that position
    _, cache = model.run_with_cache(
        tokens, out[:, :-1], one_zero_attention_mask=mask, names_filter="decoder.*.hook_resid_post"
    )
    last = f"decoder.{model.cfg.n_decoder_layers - 1}.hook_resid_post"
    torch.testing.assert_close(steps[-1][last][:, 0], cache[last][:, -1], atol=1e-5, rtol=0)


def test_sampling_is_seeded_and_respects_top_k(pair):
    _, model = pair
    tokens, mask, _, _ = random_batch(model.cfg.d_vocab, 2, 9, 2)
    a = model.generate(tokens, 8, one_zero_attention_mask=mask, do_sample=True, seed=1, stop_at_eos=False)
    b = model.generate(tokens, 8, one_zero_attention_mask=mask, do_sample=True, seed=1, stop_at_eos=False)
    assert torch.equal(a, b)
    top1 = model.generate(tokens, 8, one_zero_attention_mask=mask, do_sample=True, top_k=1, seed=2, stop_at_eos=False)
    greedy = model.generate(tokens, 8, one_zero_attention_mask=mask, stop_at_eos=False)
    assert torch.equal(top1, greedy)
    tiny_p = model.generate(
        tokens, 8, one_zero_attention_mask=mask, do_sample=True, top_p=1e-6, seed=3, stop_at_eos=False
    )
    assert torch.equal(tiny_p, greedy)
    # temperature 0 is greedy, as TransformerLens's sample_logits; top_k and top_p together are refused (it would
    # silently apply only top_k)
    zero_t = model.generate(tokens, 8, one_zero_attention_mask=mask, do_sample=True, temperature=0, stop_at_eos=False)
    assert torch.equal(zero_t, greedy)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(tokens, 3, one_zero_attention_mask=mask, do_sample=True, temperature=-1)
    with pytest.raises(ValueError, match="exclusive"):
        model.generate(tokens, 3, one_zero_attention_mask=mask, do_sample=True, top_k=2, top_p=0.5)


def test_text_in_text_out_with_byte_tokenizer():
    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny-random")
    assert isinstance(model.tokenizer, ByteTokenizer)
    out = model.generate("abc", 5)
    assert isinstance(out, str)
    batch = model.generate(["abc", "hello"], 5)
    assert isinstance(batch, list) and len(batch) == 2
    tokens = model.generate(["abc", "hello"], 5, return_type="tokens")
    assert tokens.shape[0] == 2 and tokens[0, 0] == model.cfg.decoder_start_token_id


def test_byte_tokenizer_round_trips():
    tok = ByteTokenizer()
    for text in ["", "hello", "naïve café ✓", "tab\tnew\nline"]:
        ids = tok.encode(text)
        assert ids[-1] == 1 and all(3 <= i < 259 for i in ids[:-1])
        assert tok.decode(ids, skip_special_tokens=True) == text
    batch = tok(["ab", "abcd"], return_tensors="pt")
    assert batch["input_ids"].tolist() == [[100, 101, 1, 0, 0], [100, 101, 102, 103, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert tok.convert_ids_to_tokens([0, 1, 2, 100, 3 + 0xE2]) == ["<pad>", "</s>", "<unk>", "a", "<0xE2>"]
    # matches the ByT5 scheme of transformers' own tokenizer
    from transformers import ByT5Tokenizer

    assert tok.encode("naïve ✓") == ByT5Tokenizer().encode("naïve ✓")


def test_a_huge_max_new_tokens_allocates_nothing_for_it(pair):
    """`max_new_tokens` is a bound, not a size: nothing is allocated for it, so 10**12 with rows that stop at EOS
    gives what 10 gives (greedy, sampled and with beams)."""
    _, model = pair
    tokens, mask, _, _ = random_batch(model.cfg.d_vocab, 2, 6, 1)
    every_id = list(range(model.cfg.d_vocab))  # every row stops at its first token
    for kw in ({}, {"num_beams": 3}, {"do_sample": True, "seed": 0}):
        want = model.generate(tokens, 10, one_zero_attention_mask=mask, eos_token_id=every_id, verbose=False, **kw)
        got = model.generate(tokens, 10**12, one_zero_attention_mask=mask, eos_token_id=every_id, verbose=False, **kw)
        assert torch.equal(got, want) and got.shape[1] == 2, kw
