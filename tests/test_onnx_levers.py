"""ONNX Runtime levers: the transformer optimiser's fusions keep every named output (same values), and the
opt-in int8 graph keeps the embedded model's greedy tokens (measured against the fp32 graph)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from t5hooks import HookedEncoderDecoder
from t5hooks.apps.reversal_task import held_out_words, make_batch
from t5hooks.export import OnnxRunner, to_onnx
from t5hooks.export.metadata import read_metadata
from t5hooks.export.ort import session_options

NAMES = ["encoder.*.hook_resid_post", "decoder.*.hook_resid_post", "decoder.1.hook_resid_mid"]


@pytest.fixture(scope="module")
def tiny():
    return HookedEncoderDecoder.from_pretrained("t5hooks-tiny").eval()


@pytest.fixture(scope="module")
def batch(tiny):
    words = held_out_words()[:200]
    b = make_batch(words, tiny.tokenizer)
    return b.tokens.numpy(), b.mask.numpy()


def op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def greedy(runner: OnnxRunner, tokens: np.ndarray, mask: np.ndarray, steps: int, start: int) -> np.ndarray:
    """Free-running greedy decoding with the forward graph (no cache): `[B, steps + 1]` incl. the start token."""
    dec = np.full((tokens.shape[0], 1), start, dtype=np.int64)
    for _ in range(steps):
        logits = runner(tokens, dec, mask)["logits"]
        dec = np.concatenate([dec, logits[:, -1].argmax(-1)[:, None]], axis=1)
    return dec


@pytest.mark.slow  # exports ONNX graphs: 15-40 s each on 2 cores
@pytest.mark.parametrize("norm_hooks", [False, True])
def test_optimised_graph_keeps_named_outputs_and_values(tiny, batch, tmp_path, norm_hooks):
    names = NAMES + (["encoder.0.ln2.hook_normalized", "decoder_final_ln.hook_scale"] if norm_hooks else [])
    plain = to_onnx(tiny, tmp_path / "plain.onnx", capture=names)
    fused = to_onnx(tiny, tmp_path / "fused.onnx", capture=names, optimize=True)
    # RMSNorm is fused unless one of its internals is an output (then that fusion is switched off)
    assert ("SimplifiedLayerNormalization" in op_types(fused)) != norm_hooks
    assert "SimplifiedLayerNormalization" not in op_types(plain)
    runner = OnnxRunner(fused)
    assert "optimized" in runner.metadata and runner.metadata["capture"] == OnnxRunner(plain).metadata["capture"]
    tokens, mask = batch[0][:16], batch[1][:16]
    dec = np.random.default_rng(0).integers(3, tiny.cfg.d_vocab, (16, 7))
    want = OnnxRunner(plain)(tokens, dec, mask)
    got = runner(tokens, dec, mask)
    assert list(got) == list(want) == ["logits", *tiny.resolve_names(names)]
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)
    with torch.no_grad():
        eager = tiny.capture(names)(torch.from_numpy(tokens), torch.from_numpy(dec), torch.from_numpy(mask))
    np.testing.assert_allclose(got["logits"], eager["logits"].numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # exports ONNX graphs: 15-40 s each on 2 cores
def test_int8_graph_agrees_on_greedy_tokens(tiny, batch, tmp_path):
    """Dynamic int8 on t5hooks-tiny: >= 95% of greedy tokens equal to the fp32 graph's on 200 held-out strings
    (free-running, so a single flip counts against every later token), named outputs intact."""
    fp32 = OnnxRunner(to_onnx(tiny, tmp_path / "fp32.onnx", capture=NAMES), options=session_options(1))
    int8_path = to_onnx(tiny, tmp_path / "int8.onnx", capture=NAMES, quantize="int8")
    int8 = OnnxRunner(int8_path, options=session_options(1))
    assert (
        "MatMulInteger" in op_types(int8_path)
        and read_metadata({p.key: p.value for p in onnx.load(str(int8_path)).metadata_props})["quantized"] == "int8"
    )
    tokens, mask = batch
    start = int(tiny.cfg.decoder_start_token_id)
    steps = tokens.shape[1]
    want, got = greedy(fp32, tokens, mask, steps, start), greedy(int8, tokens, mask, steps, start)
    agreement = float((want == got).mean())
    assert agreement >= 0.95, agreement
    out = int8(tokens[:4], want[:4, :-1], mask[:4])
    assert list(out) == ["logits", *tiny.resolve_names(NAMES)]
    ref = fp32(tokens[:4], want[:4, :-1], mask[:4])["logits"]
    # int8 changes the numbers, but only a little: relative RMS error over all logits, 0.069 on t5hooks-tiny
    # (a max over single entries is 0.102 there: one logit is not the claim, the greedy agreement above is)
    error = np.linalg.norm(out["logits"] - ref) / np.linalg.norm(ref)
    assert 0 < error < 0.1, error


def test_quantize_rejects_unknown_modes(tiny, tmp_path):
    with pytest.raises(ValueError, match="quantize='int4'; valid: 'int8'"):
        to_onnx(tiny, tmp_path / "x.onnx", quantize="int4")
    assert not (tmp_path / "x.onnx").exists()


def test_session_options_levels_and_spinning():
    assert session_options(level="basic").graph_optimization_level.name == "ORT_ENABLE_BASIC"
    assert session_options(spinning=False).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(ValueError, match="level='max'; valid: disabled, basic, extended, all"):
        session_options(level="max")


@pytest.mark.slow  # exports ONNX graphs: 15-40 s each on 2 cores
def test_export_command_optimize_and_quantize(tmp_path, capsys):
    from t5hooks.apps.cli import main

    out = tmp_path / "tiny_int8.onnx"
    code = main(
        ["export", "--capture", "decoder.*.hook_resid_post", "--optimize", "--quantize", "int8", "--out", str(out)]
    )
    stdout = capsys.readouterr().out
    assert code == 0 and "int8 logits pick eager's token at" in stdout and out.is_file()
    kinds = op_types(out)
    assert "MatMulInteger" in kinds and "SimplifiedLayerNormalization" in kinds
    assert main(["export", "--format", "pt2", "--optimize", "--out", str(tmp_path / "m.pt2")]) == 2
    assert "--optimize and --quantize apply to --format onnx" in capsys.readouterr().err
