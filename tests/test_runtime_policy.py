"""Run options live outside the architecture: the kernel backend is decided once in `kernels`, and moving or
converting a model never changes the config object its caller passed in."""

import dataclasses

import pytest
import torch

from t5hooks import HookedEncoderDecoder, HookedT5Config
from t5hooks.kernels import policy


def tiny_cfg() -> HookedT5Config:
    return HookedT5Config(d_model=8, d_head=4, n_heads=2, d_mlp=8, n_layers=1, d_vocab=16, seed=0, extra={"a": [1]})


@pytest.mark.parametrize(
    "convert, dtype",
    [
        (lambda m: m.half(), torch.float16),
        (lambda m: m.bfloat16(), torch.bfloat16),
        (lambda m: m.to(torch.float64), torch.float64),
        (lambda m: m.double().float(), torch.float32),
        (lambda m: m.to("cpu", dtype=torch.float16), torch.float16),
    ],
)
def test_conversions_update_the_models_config_not_the_callers(convert, dtype):
    cfg = tiny_cfg()
    before = dataclasses.asdict(cfg)
    model = HookedEncoderDecoder(cfg)
    assert model.cfg is not cfg and model.cfg.extra is not cfg.extra
    assert convert(model) is model
    assert model.cfg.dtype == dtype == model.W_E.dtype and model.cfg.device == "cpu"
    assert dataclasses.asdict(cfg) == before  # the caller's object is untouched
    changed = {k for k, v in dataclasses.asdict(model.cfg).items() if before[k] != v}
    assert changed <= set(HookedT5Config.RUN_OPTIONS)


def test_set_use_attn_result_changes_only_this_model():
    cfg = tiny_cfg()
    model = HookedEncoderDecoder(cfg)
    model.set_use_attn_result(True)
    assert model.cfg.use_attn_result and not cfg.use_attn_result
    assert not hasattr(HookedEncoderDecoder(cfg).encoder[0].attn, "hook_result")


def test_backend_is_decided_once_at_import(monkeypatch):
    cpu = torch.device("cpu")
    decided = policy.layer_backend(cpu)
    assert decided == ("triton" if policy.INTERPRETED else "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0" if policy.INTERPRETED else "1")  # too late to matter
    assert policy.layer_backend(cpu) == decided
    assert not policy.fuses_by_default(cpu)
