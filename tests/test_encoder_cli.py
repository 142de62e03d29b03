"""`t5hooks run` / `t5hooks export` on encoder-only checkpoints, a diffusers pipeline's `--subfolder`, and
`--encoder-only` on a full checkpoint (in-process through the CLI's `main`)."""

import json

import pytest
import torch
from t5_fixtures import hf_encoder

from t5hooks.apps.cli import main


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    hf_encoder("umt5").save_pretrained(root / "text_encoder")
    return root


def test_run_encoder_only_with_subfolder(pipeline, tmp_path, capsys):
    out = tmp_path / "acts.safetensors"
    code = main(
        ["run", "--model", str(pipeline), "--subfolder", "text_encoder", "--tokens", "5 6 7 1", "--save", str(out)]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "3 encoder layers," in printed and "decoder" not in printed
    assert "last hidden state [1, 4, 32]" in printed
    from safetensors.torch import load_file

    saved = load_file(out)
    assert "encoder.2.attn.rel_pos_hook" in saved and not any(k.startswith("decoder") for k in saved)


def test_run_errors(pipeline, capsys):
    assert main(["run", "--model", str(pipeline), "--tokens", "5 6 1"]) == 2
    assert "--subfolder" in capsys.readouterr().err
    args = ["run", "--model", str(pipeline), "--subfolder", "text_encoder", "--tokens", "5 1", "--decoder-tokens", "0"]
    assert main(args) == 2
    assert "encoder-only" in capsys.readouterr().err


def test_run_encoder_only_flag_on_the_builtin_model(capsys):
    assert main(["run", "--encoder-only", "--text", "abc", "--capture", "encoder.*", "hook_*"]) == 0
    printed = capsys.readouterr().out
    assert "2 encoder layers," in printed and "last hidden state" in printed


@pytest.mark.slow
def test_export_encoder_pt2(pipeline, tmp_path, capsys):
    out = tmp_path / "enc.pt2"
    args = ["export", "--model", str(pipeline), "--subfolder", "text_encoder", "--format", "pt2", "--out", str(out)]
    args += ["--capture", "encoder.1.hook_resid_post", "--patch", "encoder.0.hook_mlp_out", "--patch-mode", "add"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "last_hidden_state + 1 captured" in printed and "ok: loaded pt2 matches eager" in printed
    assert out.is_file()


def test_extract_encoder_only_stores_what_the_full_model_stores(tmp_path, capsys):
    from t5hooks.store import ActivationStore

    (tmp_path / "c.txt").write_text("hello\nencoder only\nabc\n")
    base = ["extract", str(tmp_path / "c.txt"), "--hooks", "encoder.1.hook_resid_post", "--backend", "eager"]
    base += ["--no-progress"]
    assert main([*base, str(tmp_path / "full")]) == 0
    assert main([*base, str(tmp_path / "enc"), "--encoder-only"]) == 0
    full = ActivationStore(tmp_path / "full").load("encoder.1.hook_resid_post")
    enc = ActivationStore(tmp_path / "enc").load("encoder.1.hook_resid_post")
    assert torch.equal(full["pos"], enc["pos"]) and full["acts"].shape[0] > 10
    torch.testing.assert_close(enc["acts"], full["acts"], atol=1e-6, rtol=0)
