"""ONNX and matplotlib are optional extras: without them the core works and their features say what to install."""

import builtins
import sys

import pytest
import torch


@pytest.fixture
def missing(monkeypatch):
    """Make imports of the given top-level packages fail, as if they were not installed."""
    real_import = builtins.__import__

    def hide(*names):
        for name in list(sys.modules):
            if name.split(".")[0] in names:
                monkeypatch.delitem(sys.modules, name)

        def fake_import(name, *args, **kwargs):
            if name.split(".")[0] in names:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", fake_import)

    return hide


def test_onnx_features_name_the_extra(missing, monkeypatch):
    import t5hooks.export as export

    monkeypatch.delitem(sys.modules, "t5hooks.export.ort", raising=False)
    monkeypatch.delitem(export.__dict__, "OnnxRunner", raising=False)
    missing("onnxruntime")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 't5hooks\[onnx\]'"):
        export.OnnxRunner  # noqa: B018
    assert export.to_exported_program  # torch.export needs no extra


def test_plots_name_the_extra(missing):
    from t5hooks.analysis.plotting import heatmap

    missing("matplotlib")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 't5hooks\[plot\]'"):
        heatmap(torch.zeros(2, 2))


@pytest.mark.parametrize("command", [["export"], ["demo"], ["sae-demo"]])
def test_commands_without_the_onnx_extra_name_it(missing, monkeypatch, capsys, tmp_path, command):
    """After a plain `pip install -e .`: every command that needs the extra says which, and how to install it."""
    import t5hooks.export as export
    from t5hooks.apps.cli import main

    for name in ("OnnxRunner", "to_onnx", "OnnxGenerator", "OnnxGeneration", "to_onnx_generator"):
        monkeypatch.delitem(export.__dict__, name, raising=False)
    for module in ("ort", "onnx", "onnx_generation", "ort_optimize"):  # imported by earlier tests
        monkeypatch.delitem(sys.modules, f"t5hooks.export.{module}", raising=False)
    missing("onnx", "onnxruntime", "onnx_ir", "onnxscript")
    out = tmp_path / ("x.onnx" if command == ["export"] else "folder")
    assert main([*command, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 't5hooks[onnx]'" in err, err
    assert not out.exists()
