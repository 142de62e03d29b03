"""`extract(backend="auto")`: eager unless the measured eager speed shows that compiling pays for the rest of the
job; then it switches to the compiled capture mid-run, stores the same activations, and records the measured
speed-up for the next decision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_store import corpus, one_layer_model

from t5hooks.capture import compile_capture
from t5hooks.store import ActivationStore, extract

NAMES = ["encoder.0.hook_resid_post", "decoder.0.hook_resid_post"]


def assert_same_store(a: Path, b: Path) -> None:
    for name in NAMES:
        got, want = ActivationStore(a).load(name), ActivationStore(b).load(name)
        assert torch.equal(got["doc"], want["doc"]) and torch.equal(got["pos"], want["pos"])
        torch.testing.assert_close(got["acts"], want["acts"], atol=1e-4, rtol=1e-4)


def test_auto_keeps_a_small_job_eager(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("T5HOOKS_COMPILE_CACHE", str(tmp_path / "compile-cache"))  # nothing measured yet
    model = one_layer_model()
    kw = dict(window=8, token_budget=48, progress=False)
    extract(model, corpus(16, seed=3), NAMES, tmp_path / "eager", backend="eager", **kw)
    summary = extract(model, corpus(16, seed=3), NAMES, tmp_path / "auto", backend="auto", **kw)
    assert summary.backend.startswith("auto: eager (compiling would not pay")
    assert compile_capture(model.capture(NAMES)).cache_entry("inference").measurements() == {}  # never compiled
    assert_same_store(tmp_path / "auto", tmp_path / "eager")


@pytest.mark.slow
def test_auto_switches_to_the_compiled_capture_when_it_pays(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("T5HOOKS_COMPILE_CACHE", str(tmp_path / "compile-cache"))  # this test's measurements only
    model = one_layer_model()
    # what an earlier run on this machine measured: compiling is quick and makes the forward 4x faster
    compile_capture(model.capture(NAMES)).cache_entry("inference").record(cold_s=0.001, speedup=4.0)
    kw = dict(window=12, token_budget=40, progress=False)
    extract(model, corpus(24, seed=4), NAMES, tmp_path / "eager", backend="eager", **kw)
    summary = extract(model, corpus(24, seed=4), NAMES, tmp_path / "auto", backend="auto", **kw)
    assert summary.backend.startswith("auto: eager, then compiled after 2 batches")
    assert "t5hooks: compiling the CaptureModule for inference" in capsys.readouterr().err
    assert_same_store(tmp_path / "auto", tmp_path / "eager")
    measured = compile_capture(model.capture(NAMES)).cache_entry("inference").measurements()
    assert measured["cold_s"] > 0.001 and measured["speedup"] > 0  # the real compile time and speed-up


def test_auto_does_not_switch_when_no_work_is_left(tmp_path: Path, monkeypatch) -> None:
    """One window, two batches: at the last batch nothing is left to repay a compile, however cheap and fast it
    was measured to be, so auto stays eager (the work left counts the prompts already run in the window)."""
    monkeypatch.setenv("T5HOOKS_COMPILE_CACHE", str(tmp_path / "compile-cache"))  # this test's measurements only
    model = one_layer_model()
    compile_capture(model.capture(NAMES)).cache_entry("inference").record(cold_s=0.001, speedup=4.0)
    kw = dict(window=8, max_batch=4, token_budget=10**6, progress=False)
    summary = extract(model, corpus(8, seed=5), NAMES, tmp_path / "auto", backend="auto", **kw)
    assert summary.backend.startswith("auto: eager (compiling would not pay"), summary.backend
