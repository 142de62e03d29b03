"""`t5hooks train sae|probe|das` and `t5hooks sae-demo` end to end on t5hooks-tiny (in process, eager)."""

import json

import pytest
import torch

from t5hooks.apps.cli import main
from t5hooks.interventions.saelens_format import load_saelens


def test_train_sae_two_hooks_then_resume(tmp_path, capsys):
    out = tmp_path / "sae"
    args = ["train", "sae", "--hook", "encoder.1.hook_resid_post", "decoder.1.hook_resid_post", "--d-sae", "64"]
    args += ["--batch-size", "8", "--checkpoint-every", "3", "--out", str(out), "--no-compile"]
    assert main([*args, "--steps", "6"]) == 0
    text = capsys.readouterr().out
    assert "CE loss recovered" in text and "decoder.1.hook_resid_post: explained variance" in text
    sae = load_saelens(out / "decoder.1.hook_resid_post")
    assert sae.d_sae == 64 and sae.hook_name == "decoder.1.hook_resid_post"
    assert [m["step"] for m in json.loads((out / "metrics.json").read_text())] == [6]
    # a finished run resumed with more steps continues from step 6
    assert main([*args, "--steps", "8", "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())[-1]["step"] == 8


def test_train_probe_and_das(tmp_path):
    assert (
        main(
            [
                "train",
                "probe",
                "--hook",
                "encoder.1.hook_resid_post",
                "--steps",
                "3",
                "--out",
                str(tmp_path),
                "--no-compile",
            ]
        )
        == 0
    )
    state = torch.load(tmp_path / "probe.pt", weights_only=False)
    assert state["interventions"]["encoder.1.hook_resid_post"]["linear.weight"].shape == (26, 128)
    assert (
        main(
            [
                "train",
                "das",
                "--hook",
                "encoder.0.hook_resid_pre",
                "--k",
                "4",
                "--position",
                "1",
                "--steps",
                "3",
                "--out",
                str(tmp_path),
                "--no-compile",
            ]
        )
        == 0
    )
    assert len(torch.load(tmp_path / "das.pt", weights_only=False)["losses"]) == 3


def test_train_errors(tmp_path, capsys):
    assert main(["train", "sae", "--hook", "decoder.1.hook_resid_psot", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "did you mean" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ab"}\n')
    assert main(["train", "probe", "--hook", "hook_embed", "--data", str(bad), "--out", str(tmp_path)]) == 2
    assert "missing keys ['label']" in capsys.readouterr().err


@pytest.mark.slow
def test_sae_demo(tmp_path, capsys):
    assert main(["sae-demo", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "still exact" in text and "same active set: True" in text
    assert (tmp_path / "tiny_sae.onnx").exists() and (tmp_path / "sae" / "cfg.json").exists()
