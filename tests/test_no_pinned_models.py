"""Nothing in t5hooks keeps a model alive after the caller drops it: not extract (its cache of compiled graphs and
ONNX sessions lives on the model), captures, ONNX runners (extract's onnx backend builds one with `to_onnx` and
`OnnxRunner`, as a user would; an `OnnxRunner` itself holds a file's session, not the model), or the trainers."""

import gc
import weakref

import pytest
import torch

from t5hooks import HookedEncoderDecoder
from t5hooks.interventions.live import LiveActivations
from t5hooks.interventions.sae_training import SAETrainConfig, train_saes
from t5hooks.interventions.spliced_training import train_probe
from t5hooks.store import extract

PROMPTS = ["a red fox", "the quick brown fox", "hello"] * 2


def collected(make) -> bool:
    """Build a model, let `make(model)` use it (keeping what it returns), drop the model: is it gone?"""
    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny")
    ref = weakref.ref(model)
    kept = make(model)  # what the caller keeps (results, runners): must not hold the model
    del model
    gc.collect()
    alive = ref() is not None
    del kept
    return not alive


def batches(model, n=3):
    tokens, mask = model.to_tokens(PROMPTS[:4])
    for _ in range(n):
        yield {"input": tokens, "one_zero_attention_mask": mask, "targets": torch.zeros_like(tokens)}


@pytest.mark.parametrize("backend", ["eager", pytest.param("compile", marks=pytest.mark.slow),
                                     pytest.param("onnx", marks=pytest.mark.slow)])  # fmt: skip
def test_extract(tmp_path, backend):
    assert collected(lambda m: extract(m, PROMPTS, "encoder.1.hook_resid_post", tmp_path / backend,
                                       backend=backend, progress=False))  # fmt: skip


def test_capture_modules():
    def make(model):
        cap = model.capture(["encoder.0.hook_resid_post"])
        cap(model.to_tokens("hi")[0])
        return None

    assert collected(make)


def test_trainers():
    def make(model):
        probe = train_probe(model, "encoder.1.hook_resid_post", batches(model), 4, steps=2, compile=False)
        tokens = [{k: b[k] for k in ("input", "one_zero_attention_mask")} for b in batches(model)]
        live = LiveActivations(model, ["encoder.1.hook_resid_post"], tokens)
        saes = train_saes(live, {"encoder.1.hook_resid_post": 128}, SAETrainConfig(d_sae=32, k=2, total_steps=2),
                          progress=False)  # fmt: skip
        return probe, saes

    assert collected(make)
