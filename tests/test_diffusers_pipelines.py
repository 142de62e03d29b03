"""HookedT5Encoder inside real diffusers pipelines (tiny random PixArt-α and Flux pipelines, built offline).

The reference is the same pipeline directory loaded by diffusers itself, with transformers' T5EncoderModel.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")  # the test extra; CI requires it (conftest.REFERENCE_PACKAGES)

from diffusers import DiffusionPipeline  # noqa: E402
from diffusers_fixtures import (  # noqa: E402
    FLUX_CALL,
    NEGATIVE,
    PIXART_CALL,
    PROMPTS,
    flux_pipeline,
    pixart_pipeline,
    saved,
)

from t5hooks import HookedT5Encoder  # noqa: E402
from t5hooks.diffusion import load_pipeline, t5_components  # noqa: E402
from t5hooks.interventions import SAE  # noqa: E402
from t5hooks.text_encoder import T5TextEncoder, diffusion_lens  # noqa: E402

PIXART_ENCODE = dict(negative_prompt=NEGATIVE, max_sequence_length=PIXART_CALL["max_sequence_length"])
FLUX_ENCODE = dict(prompt_2=None, max_sequence_length=FLUX_CALL["max_sequence_length"])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {"pixart": saved(pixart_pipeline(), root / "pixart"), "flux": saved(flux_pipeline(), root / "flux")}


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pixart(dirs):
    """(reference pipeline with T5EncoderModel, pipeline with the hooked encoder)"""
    return quiet(DiffusionPipeline.from_pretrained(dirs["pixart"])), quiet(load_pipeline(dirs["pixart"]))


@pytest.fixture(scope="module")
def flux(dirs):
    return quiet(DiffusionPipeline.from_pretrained(dirs["flux"])), quiet(load_pipeline(dirs["flux"]))


def run_pixart(pipe, output_type="latent", prompt=PROMPTS, **kwargs):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, negative_prompt=NEGATIVE, generator=g, output_type=output_type, **PIXART_CALL, **kwargs).images


def run_flux(pipe, output_type="latent", prompt=PROMPTS, **kwargs):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, generator=g, output_type=output_type, **FLUX_CALL, **kwargs).images


def max_diff(a, b) -> float:
    a, b = (torch.as_tensor(x).detach().float() for x in (a, b))
    return float((a - b).abs().max())


# ---- drop-in equality with transformers' T5EncoderModel ------------------------------------------------------
def test_pixart_matches_transformers_encoder(pixart):
    ref, hooked = pixart
    assert isinstance(hooked.text_encoder, T5TextEncoder)
    assert type(ref.text_encoder).__name__ == "T5EncoderModel"
    expected, got = ref.encode_prompt(PROMPTS, **PIXART_ENCODE), hooked.encode_prompt(PROMPTS, **PIXART_ENCODE)
    for e, g in zip(expected, got):  # embeddings, mask, negative embeddings, negative mask
        assert e.shape == g.shape and e.dtype == g.dtype
        assert max_diff(e, g) < 1e-5
    assert max_diff(run_pixart(ref), run_pixart(hooked)) < 1e-4
    ref_images, images = run_pixart(ref, "np"), run_pixart(hooked, "np")
    assert images.shape == (2, 16, 16, 3) and max_diff(ref_images, images) < 1e-4


def test_flux_matches_transformers_encoder(flux):
    ref, hooked = flux
    assert isinstance(hooked.text_encoder_2, T5TextEncoder)
    assert type(hooked.text_encoder).__name__ == "CLIPTextModel"  # CLIP untouched
    expected, got = ref.encode_prompt(PROMPTS, **FLUX_ENCODE), hooked.encode_prompt(PROMPTS, **FLUX_ENCODE)
    for e, g in zip(expected, got):  # T5 embeddings, pooled CLIP embeddings, text ids
        assert e.shape == g.shape and max_diff(e, g) < 1e-5
    assert max_diff(run_flux(ref), run_flux(hooked)) < 1e-4
    assert max_diff(run_flux(ref, "np"), run_flux(hooked, "np")) < 1e-4


def test_documented_route_and_surface(dirs, flux):
    """from_pretrained(pipeline_dir, subfolder=...) then pipe.text_encoder_2 = encoder.as_text_encoder(); the
    adapter's surface matches T5EncoderModel's: outputs, hidden states, dtype, device, config, to, requires_grad_."""
    ref, _ = flux
    encoder = HookedT5Encoder.from_pretrained(dirs["flux"], subfolder="text_encoder_2")
    assert encoder.tokenizer is not None  # tokenizer_2/ beside text_encoder_2/
    te = encoder.as_text_encoder()
    pipe = quiet(DiffusionPipeline.from_pretrained(dirs["flux"], text_encoder_2=None))
    pipe.text_encoder_2 = te
    assert max_diff(run_flux(ref), run_flux(pipe)) < 1e-4

    hf = ref.text_encoder_2
    ids = pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=10, return_tensors="pt")
    for mask in (None, ids.attention_mask):
        e = hf(ids.input_ids, attention_mask=mask, output_hidden_states=True)
        g = te(ids.input_ids, mask, output_hidden_states=True)  # positional mask, as Wan passes it
        assert max_diff(e.last_hidden_state, g.last_hidden_state) < 1e-5 and g[0] is g.last_hidden_state
        assert len(g.hidden_states) == len(e.hidden_states) == encoder.cfg.n_layers + 1
        for eh, gh in zip(e.hidden_states, g.hidden_states):
            assert max_diff(eh, gh) < 1e-5
    as_tuple = te(ids.input_ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert te(ids.input_ids).hidden_states is None

    assert te.dtype == hf.dtype == torch.float32 and te.device == torch.device("cpu")
    for key in ("model_type", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size", "dense_act_fn"):
        assert getattr(te.config, key) == getattr(hf.config, key), key
    assert pipe.text_encoder_2.config.is_gated_act == hf.config.is_gated_act
    assert te.requires_grad_(False) is te and not any(p.requires_grad for p in encoder.parameters())
    te.to(torch.float64)
    assert (
        te.dtype == torch.float64 and encoder.cfg.dtype == torch.float64 and pipe.text_encoder_2.dtype == torch.float64
    )
    te.to(torch.float32)

    with pytest.raises(ValueError, match="inputs_embeds"):
        te(inputs_embeds=torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match="hook_pattern"):
        te(ids.input_ids, output_attentions=True)
    with pytest.raises(TypeError, match="unexpected arguments"):
        te(ids.input_ids, head_mask=None)


@pytest.mark.parametrize("family", ["umt5", "mt5"])
def test_umt5_and_mt5_text_encoders(family):
    """Wan's umT5 (a bias table per layer) and mT5 behind the adapter: transformers' outputs and config."""
    from t5_fixtures import hf_encoder

    hf = hf_encoder(family)
    te = HookedT5Encoder.from_pretrained("test", hf_model=hf).as_text_encoder()
    ids = torch.randint(3, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, output_hidden_states=True)
        got = te(ids, mask, output_hidden_states=True)  # Wan: text_encoder(ids, mask).last_hidden_state
    assert max_diff(expected.last_hidden_state, got.last_hidden_state) < 1e-5
    assert all(max_diff(e, g) < 1e-5 for e, g in zip(expected.hidden_states, got.hidden_states))
    assert te.config.model_type == hf.config.model_type == family
    for key in ("d_model", "num_layers", "num_heads", "d_kv", "d_ff", "vocab_size", "dense_act_fn", "is_gated_act"):
        assert getattr(te.config, key) == getattr(hf.config, key), key


def test_load_pipeline_finds_the_t5_component(dirs):
    assert t5_components(dirs["flux"]) == ["text_encoder_2"] and t5_components(dirs["pixart"]) == ["text_encoder"]
    sae = SAE(32, 64, use_error_term=True, seed=0).eval()
    edited = load_pipeline(dirs["flux"], intervene={"encoder.1.hook_resid_post": sae}, device="cpu")
    assert edited.text_encoder_2.intervene == {"encoder.1.hook_resid_post": sae}
    assert edited.text_encoder_2.config.model_type == "t5" and edited.text_encoder_2.device == torch.device("cpu")
    with pytest.raises(ValueError, match="not a T5-family text encoder.*text_encoder_2"):
        load_pipeline(dirs["flux"], "text_encoder")
    with pytest.raises(ValueError, match="pass encoder="):
        load_pipeline(dirs["flux"], text_encoder_2=None)


# ---- hooks, captures, interventions and steering during pipe(...) --------------------------------------------
def test_hooks_fire_once_per_encoder_call(pixart, flux):
    """PixArt encodes the prompt and the negative prompt (two calls), Flux's T5 only the prompt (one call)."""
    for pipe, run, calls in ((pixart[1], run_pixart, 2), (flux[1], run_flux, 1)):
        te = pipe.components["text_encoder" if run is run_pixart else "text_encoder_2"]
        counts: dict[str, int] = {}

        def count(x, hook, counts=counts):
            counts[hook.name] = counts.get(hook.name, 0) + 1

        with te.model.hooks(fwd_hooks=[(lambda name: True, count)]):
            run(pipe)
        assert set(counts) == set(te.model.hook_dict)
        assert set(counts.values()) == {calls}, counts


def test_capture_per_prompt_with_padding_mask(pixart, flux):
    _, pipe = pixart
    te = pipe.text_encoder
    names = ["encoder.*.hook_resid_post", "encoder.0.attn.hook_pattern"]
    with te.capturing(names) as record:
        run_pixart(pipe)
    assert [len(call) for call in record.calls] == [2, 2]  # prompt batch, negative prompt batch
    tokenizer = pipe.tokenizer
    for call, texts in zip(record.calls, (PROMPTS, [NEGATIVE, NEGATIVE])):
        batch = tokenizer(
            texts, padding="max_length", max_length=PIXART_CALL["max_sequence_length"], return_tensors="pt"
        )
        assert torch.equal(call.input_ids, batch.input_ids)
        assert torch.equal(call.attention_mask, batch.attention_mask) and torch.equal(
            call.padding_mask, batch.attention_mask
        )
        _, cache = te.model.run_with_cache(batch.input_ids, batch.attention_mask, names_filter=names)
        assert set(call.activations) == set(cache)
        for name in cache:  # (the fused and materialised attention paths agree to float rounding)
            assert max_diff(call.activations[name], cache[name]) < 1e-5, name
    first = record.for_text(PROMPTS[0])
    assert [(p.call, p.row) for p in first] == [(0, 0)]
    negatives = record.for_text(NEGATIVE)
    assert [(p.call, p.row) for p in negatives] == [(1, 0), (1, 1)]
    n_real = len(NEGATIVE.split()) + 1  # + EOS
    real = negatives[0].real("encoder.2.hook_resid_post")
    assert real.shape == (n_real, 32)
    assert torch.equal(real, record.calls[1].activations["encoder.2.hook_resid_post"][0, :n_real])
    with pytest.raises(ValueError, match="no position axis"):
        negatives[0].real("encoder.0.attn.hook_pattern")
    with pytest.raises(KeyError, match="recorded"):
        record.for_text("green house")
    assert len(record.prompts()) == 4

    _, pipe = flux  # no attention mask: T5 attends to the padding; the padding mask comes from the pad id
    with pipe.text_encoder_2.capturing("encoder.1.hook_resid_post") as record:
        run_flux(pipe)
    (call,) = record.calls
    assert call.attention_mask is None
    assert torch.equal(call.padding_mask, (call.input_ids != 0).long())
    assert call.padding_mask[0].sum() == len(PROMPTS[0].split()) + 1


def test_sae_and_steering_during_generation(pixart):
    ref, pipe = pixart
    te = pipe.text_encoder
    hook = "encoder.1.hook_resid_post"
    clean_embeds = pipe.encode_prompt(PROMPTS, **PIXART_ENCODE)[0]
    clean = run_pixart(pipe)
    sae = SAE(32, 64, use_error_term=True, seed=0).eval()

    with te.capturing(hook, intervene={hook: sae}) as record:  # the error term: the network sees its own activation
        embeds = pipe.encode_prompt(PROMPTS, **PIXART_ENCODE)[0]
        latents = run_pixart(pipe)
    assert max_diff(embeds, clean_embeds) < 1e-5 and max_diff(latents, clean) < 1e-4
    features = record.calls[0].activations[f"{hook}.features"]  # the SAE's side output, per prompt and position
    assert features.shape == (2, PIXART_CALL["max_sequence_length"], 64) and (features > 0).any()

    active = int(features[0].sum(0).argmax())
    sae.feature_edit = lambda f: f.index_fill(-1, torch.tensor([active]), 0.0)  # zero one feature
    try:
        with te.capturing(intervene={hook: sae}):
            ablated_embeds = pipe.encode_prompt(PROMPTS, **PIXART_ENCODE)[0]
            ablated = run_pixart(pipe)
        with te.model.hooks(interventions={hook: sae}):  # the same edit as a Python hook
            assert max_diff(pipe.encode_prompt(PROMPTS, **PIXART_ENCODE)[0], ablated_embeds) == 0.0
    finally:
        sae.feature_edit = None
    assert max_diff(ablated_embeds, clean_embeds) > 1e-3 and max_diff(ablated, clean) > 1e-3

    steer = torch.randn(32, generator=torch.Generator().manual_seed(0))
    with te.capturing(steer={"encoder.0.hook_resid_post": steer}):
        steered_embeds = pipe.encode_prompt(PROMPTS, **PIXART_ENCODE)[0]
        steered = run_pixart(pipe)
    assert max_diff(steered_embeds, clean_embeds) > 1e-3 and max_diff(steered, clean) > 1e-3
    with te.model.hooks(fwd_hooks=[("encoder.0.hook_resid_post", lambda x, hook: x + steer)]):
        assert max_diff(pipe.encode_prompt(PROMPTS, **PIXART_ENCODE)[0], steered_embeds) < 1e-6

    fixed = T5TextEncoder(te.model, steer={"encoder.0.hook_resid_post": steer})  # a fixed edit, every call
    with pytest.raises(ValueError, match="already carry an edit"):
        with fixed.capturing(steer={"encoder.0.hook_resid_post": steer}):
            pass
    pipe.text_encoder = fixed
    try:
        assert max_diff(run_pixart(pipe), steered) < 1e-6
    finally:
        pipe.text_encoder = te
    assert max_diff(run_pixart(pipe), clean) == 0.0  # nothing left behind
    assert max_diff(run_pixart(ref), clean) < 1e-4


# ---- diffusion lens ------------------------------------------------------------------------------------------
def test_diffusion_lens_against_transformers_hidden_states(pixart):
    """Layer l's readout is transformers' hidden_states[l + 1] through its final layer norm; the last layer's is the
    usual output; one call returns every layer's embeddings with one encoder forward per distinct input."""
    ref, pipe = pixart
    te, hf = pipe.text_encoder, ref.text_encoder
    n = te.model.cfg.n_layers
    calls = []
    with te.model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: calls.append(1))]):
        per_layer = diffusion_lens(pipe, PROMPTS, **PIXART_ENCODE)
    assert sorted(per_layer) == list(range(n)) and len(calls) == 2  # prompt + negative prompt, once for all layers

    batch = pipe.tokenizer(
        PROMPTS, padding="max_length", max_length=PIXART_CALL["max_sequence_length"], return_tensors="pt"
    )
    negative = pipe.tokenizer(
        [NEGATIVE] * 2, padding="max_length", max_length=PIXART_CALL["max_sequence_length"], return_tensors="pt"
    )
    with torch.no_grad():
        hidden = hf(batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True).hidden_states
        neg_hidden = hf(
            negative.input_ids, attention_mask=negative.attention_mask, output_hidden_states=True
        ).hidden_states
    for layer in range(n):
        embeds, mask, neg_embeds, neg_mask = per_layer[layer]
        readout, neg_readout = (hf.encoder.final_layer_norm(h[layer + 1]) for h in (hidden, neg_hidden))
        if layer == n - 1:
            readout, neg_readout = hidden[-1], neg_hidden[-1]  # already normed
        assert max_diff(embeds, readout) < 1e-5 and max_diff(neg_embeds, neg_readout) < 1e-5
        assert torch.equal(mask, batch.attention_mask)

    with te.lens(1):  # during generation: the pipeline draws what layer 1 says
        lens_latents = run_pixart(pipe)
    pe, pm, ne, nm = per_layer[1]
    g = torch.Generator().manual_seed(0)
    call = {k: v for k, v in PIXART_CALL.items() if k != "max_sequence_length"}
    expected = pipe(
        negative_prompt=None,
        prompt_embeds=pe,
        prompt_attention_mask=pm,
        negative_prompt_embeds=ne,
        negative_prompt_attention_mask=nm,
        generator=g,
        output_type="latent",
        **call,
    ).images
    assert max_diff(lens_latents, expected) < 1e-5
    assert max_diff(lens_latents, run_pixart(pipe)) > 1e-3
    with te.lens(-1):
        assert max_diff(run_pixart(pipe), run_pixart(ref)) < 1e-4
    with pytest.raises(ValueError, match="layers 0..2"):
        te.lens(3).__enter__()


# ---- bf16 ----------------------------------------------------------------------------------------------------
def test_bf16_pipeline(dirs):
    """A bf16 pipeline with the hooked encoder in bf16: the same numbers as transformers' bf16 T5 up to bf16
    rounding, hooks and edits active."""
    ref = quiet(DiffusionPipeline.from_pretrained(dirs["flux"], dtype=torch.bfloat16))
    pipe = quiet(load_pipeline(dirs["flux"], dtype=torch.bfloat16))
    te = pipe.text_encoder_2
    assert te.dtype == torch.bfloat16 and te.model.W_E.dtype == torch.bfloat16
    expected, got = ref.encode_prompt(PROMPTS, **FLUX_ENCODE)[0], pipe.encode_prompt(PROMPTS, **FLUX_ENCODE)[0]
    assert got.dtype == torch.bfloat16
    scale = float(expected.detach().float().abs().max())
    assert max_diff(expected, got) < 2e-2 * scale
    ref_latents, latents = run_flux(ref), run_flux(pipe)
    assert latents.dtype == torch.bfloat16 and torch.isfinite(latents.float()).all()
    assert max_diff(ref_latents, latents) < 5e-2 * float(ref_latents.float().abs().max())
    sae = SAE(32, 64, use_error_term=True, seed=0, dtype=torch.bfloat16).eval()
    with te.capturing("encoder.1.hook_resid_post", intervene={"encoder.1.hook_resid_post": sae}) as record:
        assert max_diff(pipe.encode_prompt(PROMPTS, **FLUX_ENCODE)[0], got) < 2e-2 * scale
    assert record.calls[0].activations["encoder.1.hook_resid_post"].dtype == torch.bfloat16
