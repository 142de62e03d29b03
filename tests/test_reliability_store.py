"""Reliability of the activation store, second round: one writer per store, sources that cannot change under a
resume, local paths that are never tried on the hub, no library warning aimed at the user, and a disk that
fills up or refuses writes mid-run (the previous good state survives, the error is one line)."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
from full_disk import run_cli_on_a_full_disk

from t5hooks import HookedEncoderDecoder
from t5hooks.atomic import LockHeld
from t5hooks.store import ActivationStore, extract

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TRITON_INTERPRET": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def model() -> HookedEncoderDecoder:
    return HookedEncoderDecoder.from_pretrained("t5hooks-tiny")


def prompts(n: int) -> list[str]:
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    return [" ".join(words[(i * 7 + j) % 5] for j in range(1 + i % 6)) for i in range(n)]


def progress_file(store: Path) -> Path:
    return next(store.glob("progress-*.json"))


def truncate_progress(store: Path, windows: int) -> None:
    """What a run killed after `windows` windows leaves: fewer recorded windows, not complete."""
    path = progress_file(store)
    state = json.loads(path.read_text())
    state["windows"] = state["windows"][:windows]
    state.pop("complete", None)
    state.pop("source", None)
    path.write_text(json.dumps(state))
    for shard in sorted(store.glob("shard-*"))[windows:]:
        shard.unlink()


# ---- one writer per store --------------------------------------------------------------------------------------


def test_two_extracts_into_one_folder_the_second_is_refused_naming_the_first(model, tmp_path, monkeypatch, capsys):
    """The issue's trial: a second extract with other hooks into a folder being written. The first run is held
    just before its first commit (a shard rename); the second is refused, names it and writes nothing.
    (Between processes, and a killed holder's lock taken over: tests/test_ownership.py.)"""
    import threading

    import t5hooks.atomic as atomic
    from t5hooks.apps.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(prompts(12)) + "\n")
    store = tmp_path / "acts"
    paused, resume = threading.Event(), threading.Event()
    real_rename = atomic._rename

    def rename(tmp, final):
        if final.name.startswith("shard-") and not resume.is_set():
            paused.set()
            resume.wait(60)
        real_rename(tmp, final)

    monkeypatch.setattr(atomic, "_rename", rename)
    first = threading.Thread(
        target=extract,
        args=(model, str(corpus), ["encoder.0.hook_resid_post"], store),
        kwargs=dict(backend="eager", window=4, progress=False),
    )
    first.start()
    try:
        assert paused.wait(60)
        with pytest.raises(LockHeld, match=rf"in use by t5hooks extract into .*acts \(pid {os.getpid()} on "):
            extract(model, str(corpus), ["decoder.0.hook_mlp_out"], store, backend="eager", progress=False)
        code = main(["extract", str(corpus), str(store), "--hooks", "encoder.1.hook_resid_post", "--backend", "eager"])
        err = capsys.readouterr().err.strip()
        assert code == 1 and "\n" not in err and err.startswith("t5hooks extract: error:") and "in use by" in err
    finally:
        resume.set()
        first.join(60)
    rows = ActivationStore(store).load("encoder.0.hook_resid_post")  # the first run's store, whole and readable
    assert rows["doc"].unique().tolist() == list(range(12))
    assert not (store / ".t5hooks-lock-rank0").exists()


# ---- sources that cannot change under a resume ---------------------------------------------------------------


def test_a_file_edited_inside_the_stored_part_is_refused_on_resume(model, tmp_path):
    """The edit sits beyond the first and before the last MiB: a size + ends fingerprint cannot see it."""
    big = "x" * (1_150_000)  # long lines (truncated to max_tokens): the window covers more than 1 MiB
    lines = [big, "alpha beta", "gamma delta", big, "eps", "alpha"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    store = tmp_path / "acts"
    kwargs = dict(backend="eager", window=3, max_tokens=16, truncate=True, progress=False)
    extract(model, str(corpus), ["encoder.0.hook_resid_post"], store, **kwargs)
    truncate_progress(store, windows=1)  # as if killed after the first window
    text = corpus.read_text()
    at = text.index("gamma delta")
    assert 1 << 20 < at < corpus.stat().st_size - (1 << 20)
    corpus.write_text(text.replace("gamma delta", "GAMMA DELTA"))  # same size, inside window 0
    with pytest.raises(ValueError, match=r"the source has changed since window 0 was stored"):
        extract(model, str(corpus), ["encoder.0.hook_resid_post"], store, **kwargs)
    # restored, it resumes; an edit after the stored windows is data not stored yet: fine
    corpus.write_text(text.replace("\neps\n", "\nEPS\n"))
    summary = extract(model, str(corpus), ["encoder.0.hook_resid_post"], store, **kwargs)
    assert summary.windows_resumed == 1 and summary.prompts == 3
    # and a complete store says so when its file has changed since
    corpus.write_text(text.replace("alpha beta", "ALPHA BETA"))
    with pytest.raises(ValueError, match=r"the source has changed since this store was stored"):
        extract(model, str(corpus), ["encoder.0.hook_resid_post"], store, **kwargs)


@pytest.mark.slow  # imports datasets and builds it twice (~8 s loaded)
def test_a_changed_local_dataset_has_another_fingerprint(model, tmp_path):
    pytest.importorskip("datasets")
    data = tmp_path / "dataset"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts(6)))
    store = tmp_path / "acts"
    extract(model, str(data), ["encoder.0.hook_resid_post"], store, backend="eager", progress=False)
    (data / "train.jsonl").write_text("".join(json.dumps({"text": p.upper()}) + "\n" for p in prompts(6)))
    with pytest.raises(ValueError, match=r"(?s)different settings.*source\.revision"):
        extract(model, str(data), ["encoder.0.hook_resid_post"], store, backend="eager", progress=False)


@pytest.mark.parametrize("name", ["corpus.txt", "./corpus", "data/corpus", "~/no-such-corpus.jsonl", "a/b/c"])
def test_a_missing_local_source_is_reported_at_once(model, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # "data/corpus": its first folder exists here, so it is a path
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=rf"no such file or folder: '{name}' \(a local path"):
        extract(model, name, ["encoder.0.hook_resid_post"], tmp_path / "acts", backend="eager", progress=False)
    assert time.perf_counter() - start < 5
    assert not (tmp_path / "acts").exists()


def test_a_missing_local_model_folder_is_reported_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no such directory: 'models/t5-small' \(a local path"):
        HookedEncoderDecoder.from_pretrained("models/t5-small")


# ---- small ones ---------------------------------------------------------------------------------------------


def test_an_empty_store_loads_with_the_dtypes_of_a_full_one(model, tmp_path):
    full = extract(model, prompts(3), ["encoder.0.hook_resid_post"], tmp_path / "full", backend="eager", progress=False)
    empty = extract(model, [], ["encoder.0.hook_resid_post"], tmp_path / "empty", backend="eager", progress=False)
    a = ActivationStore(full.out_dir).load("encoder.0.hook_resid_post")
    b = ActivationStore(empty.out_dir).load("encoder.0.hook_resid_post")
    assert {k: v.dtype for k, v in a.items()} == {k: v.dtype for k, v in b.items()}
    assert b["pos"].dtype == torch.int32 and len(b["doc"]) == 0


def test_the_first_extract_of_a_process_warns_nothing(tmp_path):
    """Its shape probe and its batches pass their masks: no warning meant for a user's unmasked input."""
    fresh = HookedEncoderDecoder.from_pretrained("t5hooks-tiny")  # no warning state from other tests
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, hooks in enumerate([["decoder.0.hook_resid_post"], ["encoder.0.hook_resid_post", "hook_encoder_out"]]):
            extract(fresh, ["hello there", "a", "xyz"], hooks, tmp_path / f"s{i}", backend="eager", progress=False)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []


# ---- a disk that fills up or refuses writes mid-run -------------------------------------------------------------


@pytest.mark.slow  # a child process under a file-size limit (~20 s on a loaded 2-core machine)
def test_extract_on_a_full_disk_keeps_the_stored_windows_and_resumes(model, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(prompts(16)) + "\n")
    store = tmp_path / "acts"
    args = ["extract", str(corpus), str(store), "--hooks", "encoder.*.hook_resid_post", "--backend", "eager",
            "--window", "4", "--no-progress"]  # fmt: skip
    extract(model, str(corpus), ["encoder.*.hook_resid_post"], tmp_path / "reference", backend="eager", window=4,
            progress=False)  # fmt: skip
    shard_bytes = max(p.stat().st_size for p in (tmp_path / "reference").glob("shard-*"))
    # a file-size limit below one shard: the first shard cannot be written
    out = run_cli_on_a_full_disk(shard_bytes // 2, args, ENV)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(err) == 1 and "t5hooks extract: error:" in err[0], out.stderr[-2000:]
    assert "File too large" in err[0] or "No space" in err[0]
    assert not list(store.glob("shard-*")) and not [p for p in store.iterdir() if ".tmp-" in p.name]
    # the disk frees up: the same command resumes and the store equals an uninterrupted run
    from t5hooks.apps.cli import main

    assert main(args) == 0
    got = ActivationStore(store).load("encoder.1.hook_resid_post")
    want = ActivationStore(tmp_path / "reference").load("encoder.1.hook_resid_post")
    assert all(torch.equal(got[k], want[k]) for k in want)
