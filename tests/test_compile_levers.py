"""`compile_capture`: the compiled capture module with inductor freezing (oneDNN prepacking) and bf16 autocast."""

import pytest
import torch

from t5hooks import HookedEncoderDecoder, HookedT5Config
from t5hooks.capture import compile_capture


@pytest.mark.slow
def test_compile_capture_levers_match_eager():
    cfg = HookedT5Config(d_model=32, d_head=8, n_heads=4, d_mlp=64, n_layers=2, d_vocab=64, gated_mlp=True, seed=0)
    model = HookedEncoderDecoder(cfg).eval()
    g = torch.Generator().manual_seed(0)
    tokens, dec = torch.randint(3, 64, (2, 9), generator=g), torch.randint(3, 64, (2, 4), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    names = ["encoder.*.hook_resid_post", "decoder.1.hook_resid_post"]
    cap = model.capture(names)
    with torch.no_grad():
        want = cap(tokens, dec, mask)
    frozen = compile_capture(cap, freeze=True)(tokens, dec, mask)
    assert list(frozen) == list(want)
    for name in want:
        torch.testing.assert_close(frozen[name], want[name], rtol=1e-5, atol=1e-5)
    bf16 = compile_capture(cap, freeze=True, bf16=True)(tokens, dec, mask)
    assert all(v.dtype == torch.float32 for v in bf16.values())
    error = (bf16["logits"] - want["logits"]).abs().max() / want["logits"].abs().max()
    assert 0 < error < 5e-2  # bf16 rounding: different, but close
