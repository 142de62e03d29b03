"""Greedy generation on ONNX Runtime (encoder graph + one-step decoder graph with a KV cache) against
`model.generate`: tokens, EOS handling with padding, and per-step activations."""

import numpy as np
import onnx
import pytest
import torch
from t5_fixtures import random_batch

from t5hooks import HookedEncoderDecoder, HookedT5Config
from t5hooks.export import OnnxGenerator, to_onnx_generator
from t5hooks.export.ort import _resolve_shape

pytestmark = pytest.mark.slow  # every test shares one exported encoder/decoder pair (a long module set-up)

VOCAB = 48
CAPTURE = [
    "hook_encoder_out",  # the same tensor as the graph's own `encoder_out` output
    "encoder.0.hook_resid_post",
    "decoder.*.cross_attn.hook_k",  # projected once, in the encoder graph
    "decoder.*.hook_resid_post",
    "decoder.0.attn.hook_pattern",  # keys grow by one per step
    "decoder.0.attn.rel_pos_hook",
    "decoder.1.cross_attn.hook_pattern",
    "unembed.hook_in",
]


@pytest.fixture(scope="module")
def model():
    # T5 v1.1 style (untied unembedding): with these random weights greedy decoding gives varied tokens
    cfg = HookedT5Config(
        d_model=32,
        d_head=4,
        n_heads=2,
        d_mlp=32,
        n_layers=1,
        n_decoder_layers=2,
        d_vocab=VOCAB,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        seed=3,
        tie_word_embeddings=False,
        scale_logits=False,
    )
    return HookedEncoderDecoder(cfg).eval()


@pytest.fixture(scope="module")
def generator(model, tmp_path_factory):
    return OnnxGenerator.export(model, tmp_path_factory.mktemp("gen") / "graphs", CAPTURE)


def assert_close(actual, expected, name):
    """fp32 agreement, relative to the tensor's scale."""
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, atol=1e-5 * scale, rtol=0, err_msg=name)


def padded_batch(batch=3, enc=9, seed=1):
    tokens, mask, _, _ = random_batch(VOCAB, batch, enc, 1, seed=seed)
    return tokens, mask


def test_graph_names(generator):
    encoder = onnx.load(str(generator.encoder.path)).graph
    decoder = onnx.load(str(generator.decoder.path)).graph
    assert [i.name for i in encoder.input] == ["input", "one_zero_attention_mask"]
    assert [o.name for o in encoder.output] == [
        "encoder_out",
        "cross.0.key",
        "cross.0.value",
        "cross.1.key",
        "cross.1.value",
        "encoder.0.hook_resid_post",
        "hook_encoder_out",
        "decoder.0.cross_attn.hook_k",
        "decoder.1.cross_attn.hook_k",
    ]
    assert [i.name for i in decoder.input] == [
        "decoder_input",
        "one_zero_attention_mask",
        "past.0.key",
        "past.0.value",
        "past.1.key",
        "past.1.value",
        "cross.0.key",
        "cross.0.value",
        "cross.1.key",
        "cross.1.value",
    ]
    assert [o.name for o in decoder.output] == [
        "logits",
        "present.0.key",
        "present.0.value",
        "present.1.key",
        "present.1.value",
        "decoder.0.attn.rel_pos_hook",
        "decoder.0.attn.hook_pattern",
        "decoder.0.hook_resid_post",
        "decoder.1.cross_attn.hook_pattern",
        "decoder.1.hook_resid_post",
        "unembed.hook_in",
    ]
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in decoder.output}
    assert dims["present.0.key"] == ["batch", 2, "past + 1", 4]
    assert dims["decoder.0.attn.hook_pattern"] == ["batch", 2, 1, "past + 1"]


def test_greedy_tokens_and_step_activations_match_model_generate(model, generator):
    tokens, mask = padded_batch()
    free = model.generate(tokens, 8, one_zero_attention_mask=mask, stop_at_eos=False)

    # An EOS id that one row emits early and the other rows never do: that row stops and is padded.
    def elsewhere(row):
        return set(free[[r for r in range(len(free)) if r != row], 1:].flatten().tolist())

    choices = [(row, t) for row in range(len(free)) for t in free[row, 1:4].tolist() if t not in elsewhere(row)]
    assert choices, f"no row-specific token to use as EOS in {free.tolist()}"
    row, eos = choices[0]
    expected, caches = model.generate(
        tokens, 8, one_zero_attention_mask=mask, eos_token_id=eos, return_cache=True, names_filter=CAPTURE
    )
    result = generator.generate(tokens, 8, one_zero_attention_mask=mask, eos_token_id=eos)
    np.testing.assert_array_equal(result.tokens, expected.numpy())
    assert (result.tokens[row] == eos).any() and result.tokens[row, -1] == model.cfg.pad_token_id
    assert result.tokens.shape[1] == 9  # the other rows ran to max_new_tokens
    assert len(result.steps) == len(caches) == result.tokens.shape[1] - 1
    for step, cache in enumerate(caches):
        assert sorted(result.steps[step]) == sorted(generator.capture["decoder"])
        for name, value in result.steps[step].items():
            assert_close(value, cache[name].numpy(), f"step {step} {name}")
    assert result.steps[3]["decoder.0.attn.hook_pattern"].shape == (3, 2, 1, 4)
    for name, value in result.encoder.items():  # eager computes these at step 0
        assert_close(value, caches[0][name].numpy(), name)


def test_stacked_steps_equal_teacher_forced_forward(model, generator):
    tokens, mask = padded_batch(batch=2, enc=6, seed=4)
    result = generator.generate(tokens, 5, one_zero_attention_mask=mask, stop_at_eos=False)
    decoder_input = torch.from_numpy(result.tokens[:, :-1])
    _, cache = model.run_with_cache(tokens, decoder_input, one_zero_attention_mask=mask, names_filter=CAPTURE)
    for name in ("decoder.1.hook_resid_post", "unembed.hook_in", "decoder.1.cross_attn.hook_pattern"):
        assert_close(result.stacked(name), cache[name].numpy(), name)
    last = result.steps[-1]["decoder.0.attn.hook_pattern"]  # the last query row of the full pattern
    assert_close(last, cache["decoder.0.attn.hook_pattern"][:, :, -1:].numpy(), "last pattern row")
    with pytest.raises(ValueError, match="grows each step"):
        result.stacked("decoder.0.attn.hook_pattern")


def test_single_row_without_mask(model, generator):
    tokens = torch.randint(3, VOCAB, (1, 4), generator=torch.Generator().manual_seed(7))
    expected = model.generate(tokens, 3)
    np.testing.assert_array_equal(generator.generate(tokens.numpy(), 3).tokens, expected.numpy())


def test_right_padded_batch_without_mask_attends_everything_and_warns(model, generator):
    """No mask means every token is attended (as model.generate and TransformerLens); a batch that looks
    right-padded (EOS then pads) warns on every call."""
    tokens, _ = padded_batch(batch=3, enc=7, seed=5)
    tokens[1, 3], tokens[2, 0] = 1, 1  # rows 1 and 2 end in EOS then pads, as a tokenizer pads
    expected = model.generate((tokens, torch.ones_like(tokens)), 4, stop_at_eos=False)
    for _ in range(2):
        with pytest.warns(UserWarning, match="right-padded"):
            result = generator.generate(tokens, 4, stop_at_eos=False)
        np.testing.assert_array_equal(result.tokens, expected.numpy())


def test_output_shapes_resolve_from_input_axes(generator):
    """With CUDA, the runner preallocates every output from the input axis sizes (IOBinding): check on CPU
    that each output shape of both graphs, 'past + 1' included, resolves to what ONNX Runtime returns."""
    tokens, mask = padded_batch(batch=2, enc=5)
    encoded = generator.encoder(input=tokens, one_zero_attention_mask=mask)
    past = np.zeros((2, 2, 3, 4), dtype=np.float32)
    step_feeds = {
        "decoder_input": np.zeros((2, 1), dtype=np.int64),
        "one_zero_attention_mask": mask.numpy(),
        **{f"past.{layer}.{kv}": past for layer in range(2) for kv in ("key", "value")},
        **{name: value for name, value in encoded.items() if name.startswith("cross.")},
    }
    encoder_feeds = {"input": tokens.numpy(), "one_zero_attention_mask": mask.numpy()}
    for runner, feeds, outputs in (
        (generator.encoder, encoder_feeds, encoded),
        (generator.decoder, step_feeds, generator.decoder.run(step_feeds)),
    ):
        sizes = {
            dim: size
            for name, spec in runner.inputs.items()
            for dim, size in zip(spec.shape, feeds[name].shape)
            if isinstance(dim, str)
        }
        for name, value in outputs.items():
            assert _resolve_shape(runner.output_shapes[name], sizes) == value.shape, name


def test_bad_inputs(generator, tmp_path, model):
    with pytest.raises(ValueError, match="input must hold integer token ids of shape \\[batch, pos\\]"):
        generator.generate(torch.rand(2, 3), 2)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        generator.generate(torch.ones(1, 3, dtype=torch.long), 0)
    with pytest.raises(FileNotFoundError, match="to_onnx_generator"):
        OnnxGenerator(tmp_path)
    with pytest.raises(ValueError, match="no hook point matches 'decoder.0.hook_resid_psot'"):
        to_onnx_generator(model, tmp_path / "g", ["decoder.0.hook_resid_psot"])
