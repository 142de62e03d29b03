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
