"""`t5hooks train sae|probe|das` and `t5hooks sae-demo` end to end on t5hooks-tiny (in process, eager), training
from an activation store, and every argument checked before any work (under torchrun: test_sae_distributed.py)."""

import json
import re
from pathlib import Path

import pytest
import torch
from full_disk import run_cli_on_a_full_disk
from sae_runs import tiny_store

from t5hooks.apps.cli import main
from t5hooks.interventions import load_interventions, load_saelens

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ["encoder.1.hook_resid_post", "decoder.1.hook_resid_post"]


def test_train_sae_two_hooks_then_resume(tmp_path, capsys):
    out = tmp_path / "sae"
    args = ["train", "sae", "--hook", *HOOKS, "--d-sae", "64", "--batch-size", "8", "--checkpoint-every", "3"]
    args += ["--out", str(out)]
    assert main([*args, "--steps", "6"]) == 0
    text = capsys.readouterr().out
    assert "CE loss recovered" in text and "decoder.1.hook_resid_post: explained variance" in text
    sae = load_saelens(out / "decoder.1.hook_resid_post")
    assert sae.d_sae == 64 and sae.hook_name == "decoder.1.hook_resid_post"
    assert [m["step"] for m in json.loads((out / "metrics.json").read_text())] == [6]
    assert main([*args, "--steps", "8"]) == 2  # a previous run is there: --resume or --force
    assert "holds a previous run (checkpoint.pt, metrics.json); --resume to continue it" in capsys.readouterr().err
    assert main([*args, "--steps", "8", "--resume"]) == 2  # more steps change the schedule: deliberate only
    assert "total_steps: " in capsys.readouterr().err
    assert main([*args, "--steps", "8", "--resume", "--override", "steps"]) == 0
    assert json.loads((out / "metrics.json").read_text())[-1]["step"] == 8
    assert main([*args, "--steps", "2", "--force"]) == 0  # replaced: a new run from step 0
    assert [m["step"] for m in json.loads((out / "metrics.json").read_text())] == [2]


def test_train_probe_and_das(tmp_path):
    common = ["--steps", "3", "--out", str(tmp_path)]
    assert main(["train", "probe", "--hook", "encoder.1.hook_resid_post", *common]) == 0
    state = load_interventions(tmp_path / "probe.pt")  # weights_only
    assert state["interventions"]["encoder.1.hook_resid_post"]["linear.weight"].shape == (26, 128)
    das = ["train", "das", "--hook", "encoder.0.hook_resid_pre", "--k", "4", "--position", "1", *common]
    assert main(das) == 0
    assert len(load_interventions(tmp_path / "das.pt")["losses"]) == 3
    assert main(das) == 2  # das.pt exists: --force replaces it
    assert main([*das, "--force"]) == 0


def test_train_errors_come_before_any_work(tmp_path, capsys):
    assert main(["train", "sae", "--hook", "decoder.1.hook_resid_psot", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "did you mean" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ab"}\n')
    assert main(["train", "probe", "--hook", "hook_embed", "--data", str(bad), "--out", str(tmp_path)]) == 2
    assert "missing keys ['label']" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("")
    base = ["train", "sae", "--hook", "hook_embed", "--out", str(tmp_path / "o")]
    for extra, message in [
        (["--l1", "nan"], "--l1 must be a finite number >= 0, got nan"),
        (["--lr", "-1"], "--lr must be a finite number > 0"),
        (["--lr", "inf"], "--lr must be a finite number > 0"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--d-sae", "4", "--k", "8"], "--k 8 must not exceed --d-sae 4"),
        (["--override", "lr"], "--override changes a resumed run's settings: it needs --resume"),
        (["--store", str(tmp_path), "--model", "t5-small"], "--store trains from stored activations"),
        (["--model", "some/model"], "--text is required for models other than t5hooks-tiny"),
        *([(["--device", "cuda"], "CUDA is not available here")] if not torch.cuda.is_available() else []),
        (["--device", "tpu"], "--device 'tpu' is not a device"),
    ]:
        assert main([*base, *extra, "--debug"]) == 2, extra  # --debug is taken by every subcommand
        assert message in capsys.readouterr().err, extra
    assert main(["train", "sae", "--hook", "hook_embed", "--out", str(afile)]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was written


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("store") / "acts")


def test_train_sae_from_a_store(store, tmp_path, capsys):
    """One pass over the store feeds every SAE (hooks given as globs); resume after it skips what was done."""
    out = tmp_path / "run"
    args = ["train", "sae", "--store", str(store), "--hook", "encoder.*", "hook_embed", "--d-sae", "32", "--k", "4"]
    args += ["--batch-size", "32", "--checkpoint-every", "2", "--out", str(out)]
    assert main([*args, "--steps", "4"]) == 0
    text = capsys.readouterr().out
    assert "hook_embed: explained variance" in text and "encoder.0.hook_resid_pre: explained" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics[-1]["tokens"] == 4 * 32 and metrics[-1]["step"] == 4
    assert load_saelens(out / "hook_embed").hook_name == "hook_embed"
    assert main([*args, "--steps", "6", "--resume", "--override", "steps"]) == 0
    assert json.loads((out / "metrics.json").read_text())[-1]["tokens"] == 6 * 32


@pytest.mark.slow
def test_sae_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["sae-demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "still exact" in text and "same active set: True" in text
    assert (out / "tiny_sae.onnx").exists() and (out / "sae" / "cfg.json").exists()
    assert main(["sae-demo", "--out", str(out)]) == 2  # its folder exists: --force to replace it
    assert "--force" in capsys.readouterr().err


@pytest.mark.slow  # a child process trains under a file-size limit (~10 s)
def test_train_on_a_full_disk_keeps_the_last_checkpoint_and_resumes(tmp_path):
    """The disk fills up while a resumed run writes its next checkpoint: one-line error, exit 1, the previous
    checkpoint, SAE and metrics intact byte for byte, no temporary files; once there is room the same command
    finishes the run."""
    import os

    out = tmp_path / "sae"
    args = ["train", "sae", "--hook", HOOKS[0], "--d-sae", "64", "--batch-size", "8", "--checkpoint-every", "3"]
    args += ["--out", str(out)]
    assert main([*args, "--steps", "3"]) == 0
    before = {
        p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and ".t5hooks-lock" not in p.name
    }
    limit = (out / "checkpoint.pt").stat().st_size // 2  # the next checkpoint cannot be written
    more = [*args, "--steps", "6", "--resume", "--override", "steps"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    child = run_cli_on_a_full_disk(limit, more, env)
    err = [line.strip() for line in re.split(r"[\r\n]", child.stderr) if "error" in line]  # the rest: progress bars
    assert child.returncode == 1 and len(err) == 1 and err[0].startswith("t5hooks train: error:"), child.stderr[-2000:]
    assert "File too large" in err[0] or "No space" in err[0]
    after = {
        p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and ".t5hooks-lock" not in p.name
    }
    assert after == before  # nothing half-written, nothing lost
    assert main(more) == 0
    assert json.loads((out / "metrics.json").read_text())[-1]["step"] == 6
