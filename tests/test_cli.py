"""The `t5hooks` command: help for every subcommand (in-process); run, errors and the demo in a subprocess."""

import os
import subprocess
import sys

import pytest

SUBCOMMANDS = ["run", "demo", "train-tiny", "bench", "export", "train", "sae-demo"]


def t5hooks(*args, timeout=300, cwd=None, offline=False):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    if offline:
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "t5hooks.apps.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    "argv",
    [
        [],
        *([sub] for sub in SUBCOMMANDS),
        ["bench", "attention"],
        ["bench", "model"],
        ["bench", "cpu"],
        ["bench", "sae"],
        *(["train", what] for what in ("sae", "probe", "das")),
    ],
    ids=lambda argv: "-".join(argv) or "t5hooks",
)
def test_help(argv, capsys):
    """`--help` of the command, each subcommand and each benchmark, in-process (no torch import per case)."""
    from t5hooks.apps.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.slow
def test_run_summarises_and_saves(tmp_path):
    out = tmp_path / "acts.safetensors"
    result = t5hooks("run", "--text", "hooks", "--capture", "*.hook_resid_post", "*pattern", "--save", str(out))
    assert result.returncode == 0, result.stderr
    assert "decoder.1.hook_resid_post" in result.stdout and "strongest attention links" in result.stdout
    from safetensors.torch import load_file

    assert "encoder.0.hook_resid_post" in load_file(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--capture", "encoder.0.hook_resid_psot"], "did you mean"),
        (["run", "--tokens", "1 2 x"], "integers"),
        (["run", "--tokens", "999999"], "valid ids"),
        (["run", "--model", "/nonexistent/dir"], "could not load model"),
    ],
)
def test_bad_input_exits_nonzero_with_a_clear_message(args, message):
    result = t5hooks(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_demo_runs_offline_end_to_end(tmp_path):
    result = t5hooks("demo", "--out", str(tmp_path / "demo"), "--word", "hooked", offline=True)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "'hooked' -> 'dekooh'" in out
    assert "anti-diagonal" in out and "hurts most" in out and "ONNX Runtime vs eager" in out and "OK" in out
    assert (tmp_path / "demo" / "cross_attention.png").stat().st_size > 1000
    assert (tmp_path / "demo" / "t5hooks-tiny.onnx").exists()
    again = t5hooks("demo", "--out", str(tmp_path / "demo"), offline=True)  # its files exist: --force replaces them
    assert again.returncode == 2 and "holds a previous demo (cross_attention.png); pass --force" in again.stderr
