"""torch.export (.pt2) and TorchScript round trips of capture modules: save, load, run at a new shape."""

import warnings

import pytest
import torch
from t5_fixtures import random_batch

from t5hooks import HookedEncoderDecoder, HookedT5Config
from t5hooks.export import (
    load_exported,
    load_torchscript,
    save_exported,
    save_torchscript,
    to_exported_program,
    to_torchscript,
)

CAPTURE = [
    "encoder.*.hook_resid_post",
    "decoder.*.hook_resid_post",
    "decoder.*.cross_attn.hook_pattern",
    "decoder.0.attn.rel_pos_hook",
]
PATCH = ["encoder.0.hook_resid_mid", "decoder.1.hook_mlp_out"]
MODES = {"encoder.0.hook_resid_mid": "replace", "decoder.1.hook_mlp_out": "add"}


def tiny():
    cfg = HookedT5Config(
        d_model=16,
        d_head=4,
        n_heads=2,
        d_mlp=24,
        n_layers=2,
        n_decoder_layers=3,
        d_vocab=40,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        seed=0,
    )
    return HookedEncoderDecoder(cfg).eval()


def new_shape_inputs(batch, enc, dec):
    tokens, mask, dec_tokens, dec_mask = random_batch(40, batch, enc, dec, seed=5, pad_decoder=True)
    patches = {"encoder.0.hook_resid_mid": torch.randn(batch, enc, 16), "decoder.1.hook_mlp_out": torch.randn(1, 1, 16)}
    return tokens, dec_tokens, mask, dec_mask, patches


def assert_matches_eager(model, run):
    cap = model.capture(CAPTURE, patch=PATCH, patch_mode=MODES)
    for batch, enc, dec in [(1, 9, 1), (3, 4, 6), (2, 19, 11)]:
        args = new_shape_inputs(batch, enc, dec)
        expected = cap(*args)
        got = run(*args)
        assert list(got) == list(expected)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
def test_exported_program_round_trip(tmp_path):
    model = tiny()
    program = to_exported_program(model, CAPTURE, patch=PATCH, patch_mode=MODES)
    path = save_exported(program, tmp_path / "t5.pt2")
    loaded = load_exported(path).module()
    assert_matches_eager(model, loaded)


@pytest.mark.slow
def test_torchscript_round_trip_without_warnings(tmp_path):
    model = tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's deprecation/tracer warnings must not reach the user
        scripted = to_torchscript(model, CAPTURE, patch=PATCH, patch_mode=MODES)
        save_torchscript(scripted, tmp_path / "t5.ts")
        loaded = load_torchscript(tmp_path / "t5.ts")
    assert_matches_eager(model, loaded)
