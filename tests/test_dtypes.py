"""One dtype vocabulary everywhere: the parser itself, and the same spellings accepted by every consumer."""

import argparse

import pytest
import torch

from t5hooks import HookedEncoderDecoder, HookedT5Config
from t5hooks.dtypes import EXPORT_DTYPES, cli_dtype, dtype_name, parse_dtype
from t5hooks.store.format import storage_dtype_name

SPELLINGS = {
    torch.float32: ["float32", "fp32", "float", "torch.float32", "FP32", torch.float32],
    torch.bfloat16: ["bfloat16", "bf16", "torch.bfloat16", "BF16", torch.bfloat16],
    torch.float16: ["float16", "fp16", "half", "torch.float16", torch.float16],
}


@pytest.mark.parametrize("dtype", list(SPELLINGS))
def test_every_spelling_parses(dtype):
    for spelling in SPELLINGS[dtype]:
        assert parse_dtype(spelling) is dtype
        assert storage_dtype_name(spelling, torch.float32) == dtype_name(dtype)
        assert (
            HookedT5Config(d_model=8, d_head=4, n_heads=2, d_mlp=8, n_layers=1, d_vocab=8, dtype=spelling).dtype
            is dtype
        )


def test_auto_none_and_errors():
    assert parse_dtype("auto", allow_auto=True) == "auto"
    assert parse_dtype(None, default=torch.float16) is torch.float16
    with pytest.raises(ValueError, match=r"dtype='auto' is not supported; valid: float32, bfloat16, float16, float64"):
        parse_dtype("auto")
    with pytest.raises(ValueError, match=r"export dtype='bf16' is not supported; valid: float32, float16$"):
        parse_dtype("bf16", allowed=EXPORT_DTYPES, what="export dtype")
    with pytest.raises(ValueError, match="valid: float32"):
        parse_dtype("int8")
    with pytest.raises(ValueError):
        parse_dtype(torch.int64)


def test_cli_type_returns_the_canonical_name():
    parse = cli_dtype(EXPORT_DTYPES)
    assert parse("fp16") == "float16" and parse("torch.float32") == "float32"
    with pytest.raises(argparse.ArgumentTypeError, match="valid: float32, float16"):
        parse("bf16")


def test_from_pretrained_takes_the_same_spellings():
    """'bf16' used to fail in from_pretrained while extract took it; 'torch.bfloat16' the other way round."""
    for spelling in ("bf16", "torch.bfloat16"):
        model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny", dtype=spelling)
        assert model.W_E.dtype is torch.bfloat16 and model.cfg.dtype is torch.bfloat16
