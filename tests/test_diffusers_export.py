"""The edited text encoder exported (ONNX, torch.export) and run as a real diffusers pipeline's text-encoder stage."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers_fixtures import NEGATIVE, PIXART_CALL, PROMPTS, pixart_pipeline, saved  # noqa: E402

from t5hooks.diffusion import load_pipeline  # noqa: E402
from t5hooks.export import ExportedTextEncoder, to_exported_program  # noqa: E402
from t5hooks.export.text_encoder import baked_edits  # noqa: E402
from t5hooks.interventions import SAE  # noqa: E402

ENCODE = dict(negative_prompt=NEGATIVE, max_sequence_length=PIXART_CALL["max_sequence_length"])


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """A PixArt pipeline whose text encoder carries an SAE without error term (the network sees its
    reconstruction, one feature zeroed) and a steering vector: the edits change the output."""
    pipe = load_pipeline(saved(pixart_pipeline(), tmp_path_factory.mktemp("pipelines") / "pixart"))
    pipe.set_progress_bar_config(disable=True)
    encoder = pipe.text_encoder.model
    sae = SAE(32, 64, seed=0).eval()
    sae.feature_edit = lambda f: f.index_fill(-1, torch.tensor([3]), 0.0)
    steer = torch.randn(32, generator=torch.Generator().manual_seed(1))
    te = encoder.as_text_encoder(
        intervene={"encoder.1.hook_resid_post": sae}, steer={"encoder.0.hook_resid_post": steer}
    )
    clean = (pipe.encode_prompt(PROMPTS, **ENCODE), latents(pipe))
    pipe.text_encoder = te
    return pipe, te, clean


def latents(pipe):
    g = torch.Generator().manual_seed(0)
    return pipe(PROMPTS, negative_prompt=NEGATIVE, generator=g, output_type="latent", **PIXART_CALL).images


def check_stage(pipe, te, stage, clean):
    eager_embeds, eager_latents = pipe.encode_prompt(PROMPTS, **ENCODE), latents(pipe)
    assert float((eager_embeds[0] - clean[0][0]).detach().abs().max()) > 1e-3  # the edits matter
    pipe.text_encoder = stage
    try:
        embeds, got = pipe.encode_prompt(PROMPTS, **ENCODE), latents(pipe)
    finally:
        pipe.text_encoder = te
    for e, g in zip(eager_embeds, embeds):  # embeddings, mask, negative embeddings, negative mask
        assert e.shape == g.shape and float((e.detach().float() - g.float()).abs().max()) < 1e-5
    assert float((eager_latents - got).abs().max()) < 1e-4


@pytest.mark.slow  # ONNX export of the encoder with its SAE: ~20 s on 2 cores
def test_onnx_runtime_stage_equals_eager(edited, tmp_path):
    pipe, te, clean = edited
    path = tmp_path / "text_encoder.onnx"
    stage = ExportedTextEncoder.export(te, path)
    assert stage.dtype == torch.float32 and stage.config.to_dict() == te.config.to_dict()
    check_stage(pipe, te, stage, clean)
    reopened = ExportedTextEncoder.from_onnx(path)  # from the file alone: config from its metadata
    assert reopened.config.d_model == 32 and reopened.config.model_type == "t5"
    check_stage(pipe, te, reopened, clean)
    with pytest.raises(ValueError, match="output_hidden_states"):
        reopened(torch.ones(1, 3, dtype=torch.long), output_hidden_states=True)
    reopened.to(torch.bfloat16)  # the pipeline's dtype: outputs cast, the graph unchanged
    assert reopened(torch.ones(1, 3, dtype=torch.long))[0].dtype == torch.bfloat16


@pytest.mark.slow  # torch.export of the encoder with its SAE: ~10 s on 2 cores
def test_torch_export_stage_equals_eager(edited):
    pipe, te, clean = edited
    program = to_exported_program(te.model, intervene=baked_edits(te))
    check_stage(pipe, te, ExportedTextEncoder.from_exported(program, te.config), clean)
