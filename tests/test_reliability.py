"""Reliability: nothing half-written or overwritten by a failed or killed run, one-line CLI errors with the
right exit status, checkpoints validated and confined at load, bad runtime arguments refused.

Kills are real: a subprocess whose atomic rename (the commit point) is replaced by a pause, so SIGKILL /
SIGTERM land between "file written" and "file renamed", the worst moment."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from t5_fixtures import hf_t5

from t5hooks import HookedEncoderDecoder, HookedT5Config
from t5hooks.apps import cli
from t5hooks.atomic import (
    MANIFEST,
    ArtefactError,
    atomic_path,
    check_writable,
    remove_stale_temps,
    temp_path_for,
    verify_manifest,
    write_manifest,
)
from t5hooks.checkpoint_checks import CheckpointError, UnsafeCheckpointError

ROOT = Path(__file__).resolve().parents[1]

# A child process whose atomic renames of one file name pause (printing READY) instead of committing.
PAUSING_CHILD = textwrap.dedent(
    """
    import sys, time
    import t5hooks.atomic as atomic
    real, pause_on = atomic._rename, sys.argv[1]
    def rename(tmp, final):
        if final.name == pause_on:
            print("READY", tmp, flush=True)
            time.sleep(300)
        real(tmp, final)
    atomic._rename = rename
    exec(sys.argv[2])
    """
)


def start_paused(pause_on: str, code: str) -> tuple[subprocess.Popen, Path]:
    """Run `code` in a child; return once it is paused just before renaming a file called `pause_on`."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSING_CHILD, pause_on, textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    for line in proc.stdout:
        if line.startswith("READY"):
            return proc, Path(line.split(maxsplit=1)[1].strip())
    proc.wait()
    raise AssertionError(f"child never reached the rename: {proc.stderr.read()}")


def visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "weights_only" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---- the write discipline -------------------------------------------------------------------------


def test_temp_names_keep_the_suffix_and_stale_ones_are_cleaned(tmp_path):
    from t5hooks.ownership import Owner, me

    final = tmp_path / "model.pt2"
    tmp = temp_path_for(final)
    assert tmp.parent == tmp_path and tmp.name.startswith(".model.tmp-") and tmp.suffix == ".pt2"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = Owner(int(dead.stdout), 1, me().machine).tag  # exited, on this machine (test_ownership.py: the rule)
    stale = tmp_path / f".model.tmp-{owner}-0123abcd.pt2"
    stale.write_bytes(b"left by a killed run")
    mine = temp_path_for(final)  # this process is alive: its temp files are not stale
    mine.write_bytes(b"in progress")
    other = tmp_path / f".other.tmp-{owner}-0123abcd.pt2"  # another target's: left alone
    other.write_bytes(b"x")
    assert remove_stale_temps(final) == [stale]
    assert mine.exists() and other.exists() and not stale.exists()


def test_check_writable_fails_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        check_writable(tmp_path / "file" / "out.onnx")
    with pytest.raises(IsADirectoryError):
        check_writable(tmp_path)
    with pytest.raises(FileExistsError, match="--force"):
        check_writable(tmp_path / "file", overwrite=False)
    assert check_writable(tmp_path / "new" / "deeper" / "out.onnx") == tmp_path / "new" / "deeper" / "out.onnx"
    assert visible(tmp_path) == ["file"]  # the probe left nothing, created no directory


def test_manifest_refuses_missing_changed_and_foreign_files(tmp_path):
    (tmp_path / "a.onnx").write_bytes(b"graph a")
    (tmp_path / "b.onnx").write_bytes(b"graph b")
    with pytest.raises(ArtefactError, match="did not finish"):
        verify_manifest(tmp_path, kind="onnx-generator")
    write_manifest(tmp_path, ["a.onnx", "b.onnx"], kind="onnx-generator", fingerprint="f00d")
    assert verify_manifest(tmp_path, kind="onnx-generator")["fingerprint"] == "f00d"
    with pytest.raises(ArtefactError, match="expected 'store'"):
        verify_manifest(tmp_path, kind="store")
    (tmp_path / "b.onnx").write_bytes(b"graph B")  # same size, other bytes
    with pytest.raises(ArtefactError, match="b.onnx is not the file its manifest lists"):
        verify_manifest(tmp_path, kind="onnx-generator")
    (tmp_path / "b.onnx").unlink()
    with pytest.raises(ArtefactError, match="b.onnx is listed .* but missing"):
        verify_manifest(tmp_path, kind="onnx-generator")
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ArtefactError, match="unreadable manifest"):
        verify_manifest(tmp_path, kind="onnx-generator")


def small_onnx(value: float) -> Any:
    """A one-node ONNX model (y = x + c) with a 64 KiB initializer: enough to go to an external weights file."""
    import onnx_ir as ir

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([16384]))
    c = ir.Value(name="c", const_value=ir.tensor(np.full(16384, value, dtype=np.float32), name="c"))
    node = ir.node("Add", inputs=[x, c])
    node.outputs[0].name, node.outputs[0].type, node.outputs[0].shape = "y", x.type, x.shape
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[c], opset_imports={"": 18}, name="add")
    return ir.Model(graph, ir_version=10)


def test_a_failed_check_keeps_the_previous_graph_and_its_weights(tmp_path):
    """ONNX with external weights: a failed verification removes the new graph and the new weights file."""
    import onnxruntime as ort

    from t5hooks.export.onnx import external_data_files, save_checked

    path = tmp_path / "m.onnx"
    save_checked(small_onnx(1.0), path, external_data=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def fail(tmp: Path) -> None:
        assert ort.InferenceSession(str(tmp)).run(None, {"x": np.zeros(16384, np.float32)})[0][0] == 2.0
        raise RuntimeError("parity check failed")

    with pytest.raises(RuntimeError, match="parity check failed"):
        save_checked(small_onnx(2.0), path, external_data=True, verify=fail)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(FileExistsError):
        save_checked(small_onnx(2.0), path, external_data=True, overwrite=False)
    save_checked(small_onnx(2.0), path, external_data=True)  # a successful rewrite drops the old weights file
    (data,) = external_data_files(path)
    assert visible(tmp_path) == sorted(["m.onnx", data.name])
    assert ort.InferenceSession(str(path)).run(None, {"x": np.zeros(16384, np.float32)})[0][0] == 2.0


# ---- kills at the worst moment ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_export_killed_before_its_rename_leaves_the_previous_file(tmp_path, sig):
    out = tmp_path / "m.pt"
    out.write_bytes(b"previous export")
    code = f"""
    from t5hooks.apps.cli import main
    sys.exit(main(["export", "--format", "torchscript", "--out", {str(out)!r}, "--force"]))
    """
    proc, tmp = start_paused("m.pt", code)
    assert tmp.exists() and tmp.stat().st_size > 0  # written and verified, not yet renamed
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert out.read_bytes() == b"previous export"
    assert visible(tmp_path) == ["m.pt"]
    if sig == signal.SIGTERM:  # unwinds: the temporary file is removed, one line says so
        assert proc.returncode == 143 and not tmp.exists()
        assert_one_line(proc.stderr.read(), "t5hooks export: error: terminated")
    else:  # nothing runs on SIGKILL: the hidden temporary file stays until the next write to this target
        assert proc.returncode == -signal.SIGKILL and tmp.exists()
        with atomic_path(out) as new:
            new.write_bytes(b"next export")
        assert not tmp.exists() and out.read_bytes() == b"next export"


@pytest.mark.slow
def test_generator_directories_mixed_or_interrupted_are_refused(tmp_path):
    """Graphs from two models never load as a pair. An export of model B killed between its two graphs, over
    model A's complete export, leaves B's encoder beside A's decoder without a manifest: refused. Copying B's
    encoder into A's directory fails the manifest's hashes; a manifest forged to match fails the fingerprints."""
    from t5hooks.export import OnnxGenerator

    a = tmp_path / "a"
    OnnxGenerator.export(tiny_model(seed=1), a)
    with pytest.raises(FileExistsError):
        OnnxGenerator.export(tiny_model(seed=2), a, overwrite=False)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(a, interrupted)
    code = f"""
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    from test_reliability import tiny_model
    from t5hooks.export import OnnxGenerator
    OnnxGenerator.export(tiny_model(seed=2), {str(interrupted)!r})
    """
    proc, _ = start_paused("decoder.onnx", code)  # B's encoder is in place, A's decoder still there
    proc.kill()
    proc.wait(timeout=60)
    assert (interrupted / "encoder.onnx").read_bytes() != (a / "encoder.onnx").read_bytes()
    assert (interrupted / "decoder.onnx").read_bytes() == (a / "decoder.onnx").read_bytes()
    with pytest.raises(ArtefactError, match="did not finish"):
        OnnxGenerator(interrupted)

    mixed = tmp_path / "mixed"
    shutil.copytree(a, mixed)
    shutil.copy(interrupted / "encoder.onnx", mixed / "encoder.onnx")
    with pytest.raises(ArtefactError, match="encoder.onnx is not the file its manifest lists"):
        OnnxGenerator(mixed)
    with pytest.raises(ArtefactError, match="come from different models"):  # same sizes: the fingerprints tell
        OnnxGenerator(mixed, check_hashes=False)
    manifest = json.loads((mixed / MANIFEST).read_text())
    write_manifest(mixed, ["encoder.onnx", "decoder.onnx"], kind="onnx-generator", fingerprint=manifest["fingerprint"])
    with pytest.raises(ArtefactError, match="come from different models"):
        OnnxGenerator(mixed)
    OnnxGenerator(a).generate(np.array([[3, 4, 5]]), max_new_tokens=2)  # the complete directory still loads


# ---- train-tiny ---------------------------------------------------------------------------------------


def test_train_tiny_checks_out_before_training(tmp_path, capsys, monkeypatch):
    import t5hooks.apps.commands.train_tiny as train_tiny

    def must_not_train(**kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train_tiny, "train_tiny", must_not_train)
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, "train-tiny", "--out", str(tmp_path / "file" / "w.safetensors"))
    assert code == 2
    assert_one_line(err, "is not a directory")
    (tmp_path / "w.safetensors").write_bytes(b"kept")
    code, _, err = run_cli(capsys, "train-tiny", "--out", str(tmp_path / "w.safetensors"))
    assert code == 2
    assert_one_line(err, "already exists; pass --force")
    code, _, err = run_cli(capsys, "train-tiny", "--out", str(tmp_path / "w.bin"))
    assert code == 2
    assert_one_line(err, ".safetensors")
    assert (tmp_path / "w.safetensors").read_bytes() == b"kept"


@pytest.mark.slow
def test_train_tiny_below_min_accuracy_writes_nothing(tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"a good model")
    args = ["train-tiny", "--steps", "1", "--batch-size", "2", "--no-compile", "--out", str(out), "--force"]
    code, _, err = run_cli(capsys, *args)
    assert code == 1
    error = err.strip().splitlines()[-1]  # after the progress bar
    assert_one_line(error, "t5hooks train-tiny: error: held-out accuracy", "below --min-accuracy", "not written")
    assert out.read_bytes() == b"a good model" and visible(tmp_path) == ["w.safetensors"]


def test_train_tiny_docstring_never_targets_the_shipped_weights():
    from t5hooks.apps.commands import train_tiny

    usage = [line for line in train_tiny.__doc__.splitlines() if line.strip().startswith("t5hooks train-tiny")]
    assert usage and all("assets" not in line for line in usage)


# ---- run --save, demo, read-only targets -------------------------------------------------------------


def test_run_save_with_the_default_capture_saves_every_name(tmp_path, capsys):
    out = tmp_path / "acts.safetensors"
    code, stdout, err = run_cli(capsys, "run", "--text", "hooks", "--save", str(out))
    assert code == 0, err
    saved = load_file(out)
    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny")
    _, cache = model.run_with_cache("hooks")
    assert sorted(saved) == sorted(cache.keys())  # shared tensors (resid_post == next resid_pre) included
    for name in ("decoder.0.hook_resid_post", "decoder.1.hook_resid_pre", "encoder.0.attn.hook_q"):
        torch.testing.assert_close(saved[name], cache[name])
    assert visible(tmp_path) == ["acts.safetensors"]


@pytest.mark.parametrize(
    "args",
    [
        ["export", "--format", "pt2", "--out", "{bad}/m.pt2"],
        ["export", "--format", "torchscript", "--out", "{bad}/m.pt"],
        ["run", "--save", "{bad}/a.safetensors"],
        ["demo", "--out", "{bad}/demo"],
    ],
    ids=["pt2", "torchscript", "run-save", "demo"],
)
def test_unwritable_targets_are_one_line_errors(tmp_path, capsys, args):
    bad = tmp_path / "a-file"
    bad.write_text("not a directory")
    code, _, err = run_cli(capsys, *(a.format(bad=bad) for a in args))
    assert code == 2
    assert_one_line(err, f"t5hooks {args[0]}: error:", "a-file")


def test_a_directory_that_refuses_new_files_is_one_line(tmp_path, capsys, monkeypatch):
    """What a read-only directory does (simulated: the tests may run as root, who can write anywhere)."""

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "touch", refuse)
    code, _, err = run_cli(capsys, "run", "--save", str(tmp_path / "a.safetensors"))
    assert code == 2
    assert_one_line(err, "does not accept new files", "Permission denied")


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["demo", "--word", ""], ["--word ''", "printable ASCII"]),
        (["run", "--device", "bogus"], ["--device 'bogus' is not a device", "valid: cpu"]),
        (["run", "--device", "cuda"], ["CUDA is not available", "valid: cpu"]),
        (["run", "--model", "/nonexistent/model"], ["no such directory", "/nonexistent/model"]),
        (["run", "--model", "./typo"], ["no such directory"]),
        (["train-tiny", "--lr", "nan"], ["--lr must be a finite number > 0"]),
    ],
)
def test_usage_errors_are_one_line_with_exit_status_2(capsys, monkeypatch, args, fragments):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert_one_line(err, f"t5hooks {args[0]}: error:", *fragments)


def test_argument_errors_are_one_line(capsys):
    for args in (["run", "--dtype", "float64"], ["export"], ["bogus-command"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(args)
        assert exit_.value.code == 2
        assert_one_line(capsys.readouterr().err, "error:", "--help")


def test_runtime_failures_exit_1_and_debug_shows_the_traceback(capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded\nsecond line of detail")

    monkeypatch.setattr(HookedEncoderDecoder, "run_with_cache", broken)
    code, _, err = run_cli(capsys, "run", "--text", "x")
    assert code == 1
    assert_one_line(err, "RuntimeError: kernel exploded; second line of detail", "--debug")
    for args in (["--debug", "run", "--text", "x"], ["run", "--debug", "--text", "x"]):
        code, _, err = run_cli(capsys, *args)
        assert code == 1 and "Traceback" in err and "kernel exploded" in err.strip().splitlines()[-1]


# ---- checkpoints ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model():
    return hf_t5("t5_v1_1")


@pytest.fixture
def checkpoint(hf_model, tmp_path):
    directory = tmp_path / "ckpt"
    hf_model.save_pretrained(directory)
    return directory


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def edit_weights(directory: Path, fn) -> None:
    state = load_file(directory / "model.safetensors")
    fn(state)
    save_file(state, directory / "model.safetensors")


def drop_untied_head(directory: Path) -> None:
    edit_config(directory, tie_word_embeddings=False)  # as Flan-T5 / T5 v1.1 configs say
    edit_weights(directory, lambda s: s.pop("lm_head.weight"))


def test_old_format_pickle_checkpoints_load(hf_model, checkpoint):
    expected = HookedEncoderDecoder.from_pretrained(str(checkpoint))
    state = load_file(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()
    torch.save(state, checkpoint / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    model = HookedEncoderDecoder.from_pretrained(str(checkpoint))
    tokens = torch.tensor([[5, 6, 7, 1]])
    torch.testing.assert_close(model(tokens), expected(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_pickle_that_needs_code_is_refused_without_running_it(checkpoint, tmp_path, capsys, zip_format):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (checkpoint / "model.safetensors").unlink()
    bin_file = checkpoint / "pytorch_model.bin"
    torch.save({"shared.weight": Payload()}, bin_file, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeCheckpointError, match="not a safe checkpoint.*convert it to safetensors"):
        HookedEncoderDecoder.from_pretrained(str(checkpoint))
    code, _, err = run_cli(capsys, "run", "--model", str(checkpoint))
    assert code == 2
    assert_one_line(err, "not a safe checkpoint", "safetensors", "system")
    bin_file.write_bytes(b"\x00 not a pickle")
    code, _, err = run_cli(capsys, "run", "--model", str(checkpoint))
    assert code == 2
    assert_one_line(err, "not a readable PyTorch checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:200]),
         "not a valid safetensors file"),
        (lambda d: edit_config(d, d_ff=64), r"do not match the config's shapes: .*\(expected"),
        (lambda d: edit_config(d, d_model="32"), r"d_model='32' \(must be an integer >= 1\)"),
        (lambda d: edit_config(d, num_heads=0), r"num_heads=0"),
        (lambda d: edit_config(d, layer_norm_epsilon=0.0), r"layer_norm_epsilon=0.0 \(must be a finite number > 0\)"),
        (lambda d: edit_config(d, layer_norm_epsilon=-1e-6), r"layer_norm_epsilon"),
        (lambda d: drop_untied_head(d), "tie_word_embeddings=false but .* no lm_head"),
        (lambda d: edit_weights(d, lambda s: s["encoder.block.0.layer.0.SelfAttention.q.weight"].__setitem__(
            (0, 0), float("nan"))), r"non-finite weights .* encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight"),
        (lambda d: (d / "config.json").write_text("{broken"), "config.json is not valid JSON"),
    ],
    ids=["truncated-safetensors", "shape-mismatch", "bad-type", "zero-heads", "zero-eps", "negative-eps",
         "missing-untied-head", "nan-weight", "broken-config"],
)  # fmt: skip
def test_broken_checkpoints_are_clear_errors(checkpoint, capsys, damage, match):
    damage(checkpoint)
    with pytest.raises(ValueError, match=match):
        HookedEncoderDecoder.from_pretrained(str(checkpoint))
    code, _, err = run_cli(capsys, "run", "--model", str(checkpoint), "--tokens", "1 2 3")
    assert code == 2
    assert_one_line(err, "could not load model")


@pytest.mark.parametrize("shard", ["../outside/model.safetensors", "/abs/model.safetensors", "..\\x.safetensors"])
def test_shard_paths_outside_the_checkpoint_are_refused(checkpoint, tmp_path, capsys, shard):
    outside = tmp_path / "outside"
    outside.mkdir()
    (checkpoint / "model.safetensors").rename(outside / "model.safetensors")
    weight_map = {name: shard for name in load_file(outside / "model.safetensors")}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        HookedEncoderDecoder.from_pretrained(str(checkpoint))
    code, _, err = run_cli(capsys, "run", "--model", str(checkpoint))
    assert code == 2
    assert_one_line(err, "outside the checkpoint directory")


def test_a_broken_shard_index_is_one_line(checkpoint, capsys):
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "model.safetensors.index.json").write_text('{"metadata": {}}')
    code, _, err = run_cli(capsys, "run", "--model", str(checkpoint))
    assert code == 2
    assert_one_line(err, "not a valid shard index")


# ---- runtime arguments -----------------------------------------------------------------------------


def tiny_model(seed: int) -> HookedEncoderDecoder:
    cfg = HookedT5Config(
        d_model=16,
        d_head=4,
        n_heads=2,
        d_mlp=16,
        n_layers=1,
        n_decoder_layers=1,
        d_vocab=24,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        seed=seed,
    )
    return HookedEncoderDecoder(cfg).eval()


def test_numpy_patches_work_like_tensors():
    model = tiny_model(seed=0)
    cap = model.capture(["decoder.0.hook_resid_post"], patch=["encoder.0.hook_resid_pre"])
    tokens = torch.tensor([[3, 4, 5, 1]])
    patch = np.random.default_rng(0).standard_normal((1, 4, 16)).astype(np.float32)
    expected = cap(tokens, patches={"encoder.0.hook_resid_pre": torch.from_numpy(patch)})
    got = cap(tokens, patches={"encoder.0.hook_resid_pre": patch})
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    with pytest.raises(TypeError, match="must be a torch tensor or numpy array"):
        cap(tokens, patches={"encoder.0.hook_resid_pre": object()})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": float("nan")}, "temperature must be a finite number > 0"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": float("nan")}, r"top_p must be None or a number in \(0, 1\]"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k must be None or an integer >= 1"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"length_penalty": float("nan")}, "length_penalty must be a finite number"),
    ],
)
def test_sampling_arguments_are_validated(kwargs, match):
    model = tiny_model(seed=0)
    with pytest.raises(ValueError, match=match):
        model.generate(torch.tensor([[3, 4, 1]]), max_new_tokens=2, do_sample=True, **kwargs)
