"""Weight formats: bf16 / fp16 safetensors, fp8 (e4m3fn / e5m2, with and without scales), GGUF (F32 / F16 /
BF16 / Q8_0 / Q6_K) through the `gguf` package, bad files, and the fp16 warning.

References: transformers' T5EncoderModel loaded with the dequantised weights (what the file means), the
`gguf` package's own writer, quantiser and dequantiser.
"""

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from t5_fixtures import hf_encoder, random_batch

from t5hooks import HookedEncoderDecoder, HookedT5Encoder

ATOL = 1e-4


def last_hidden(model, hf):
    tokens, mask, _, _ = random_batch(model.cfg.d_vocab, 3, 11, 1)
    with torch.no_grad():
        ours = model(tokens, mask).float()
        ref = hf(input_ids=tokens, attention_mask=mask).last_hidden_state.float()
    return ours, ref


def hf_with(hf, state):
    """A copy of `hf` (fp32) holding `state` (HF names) instead of its own weights."""
    import copy

    other = copy.deepcopy(hf).float()
    missing, unexpected = other.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    assert not unexpected and all("embed_tokens" in m for m in missing), (missing, unexpected)
    return other.eval()


def saved(tmp_path, hf, state, name="ckpt"):
    folder = tmp_path / name
    hf.save_pretrained(folder)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


# ---- bf16 / fp16 -------------------------------------------------------------------------------


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_half_precision_safetensors_stored_or_cast(tmp_path, stored):
    hf = hf_encoder("t5")
    state = {k: v.to(stored).contiguous() for k, v in hf.state_dict().items() if "embed_tokens" not in k}
    folder = saved(tmp_path, hf, state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = HookedT5Encoder.from_pretrained(str(folder), dtype="auto")
    assert auto.W_E.dtype == stored and auto.cfg.dtype == stored
    assert (len([w for w in caught if "bfloat16" in str(w.message)]) == 1) == (stored == torch.float16)
    assert torch.equal(auto.encoder[1].mlp.in_proj, state["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"])
    cast = HookedT5Encoder.from_pretrained(str(folder), dtype=torch.float32)
    assert cast.W_E.dtype == torch.float32
    ours, ref = last_hidden(cast, hf_with(hf, state))
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_fp16_warning_only_for_the_gated_gelu_family(tmp_path):
    from t5_fixtures import hf_t5

    for variant, expected in (("t5_v1_0", 0), ("t5_v1_1", 1)):
        hf = hf_t5(variant)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = HookedEncoderDecoder.from_pretrained("live", hf_model=hf, dtype=torch.float16)
        assert len([w for w in caught if "overflow in float16" in str(w.message)]) == expected, variant
        assert model.W_E.dtype == torch.float16
    # the clamp stays: an overflowing residual comes out finite in fp16
    tokens = torch.tensor([[5, 6, 7]])
    model.encoder[0].mlp.out_proj.data.mul_(1e4)
    assert torch.isfinite(model.encode(tokens)).all()


# ---- fp8 -----------------------------------------------------------------------------------------

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def fp8_state(hf, fp8, scales):
    """Matrices cast to fp8 (norms and the bias tables stay fp32). `scales`: None (plain cast), "scale_weight"
    (one scalar per tensor, ComfyUI style) or "weight_scale" (one per output row)."""
    stored, dequantised = {}, {}
    for name, w in hf.state_dict().items():
        if "embed_tokens" in name:
            continue
        if w.ndim != 2 or "relative_attention_bias" in name:
            stored[name] = dequantised[name] = w.contiguous()
            continue
        if scales is None:
            q = w.to(fp8)
            stored[name], dequantised[name] = q, q.float()
            continue
        amax = w.abs().amax() if scales == "scale_weight" else w.abs().amax(dim=1, keepdim=True)
        scale = (amax / FP8_MAX[fp8]).float()
        q = (w / scale).to(fp8)
        stored[name] = q
        stored[name.removesuffix(".weight") + "." + scales] = scale if scales == "scale_weight" else scale[:, 0]
        dequantised[name] = q.float() * scale
    if scales == "scale_weight":
        stored["scaled_fp8"] = torch.zeros(0, dtype=fp8)  # ComfyUI's marker tensor
    return stored, dequantised


@pytest.mark.parametrize(
    "fp8,scales",
    [(torch.float8_e4m3fn, None), (torch.float8_e4m3fn, "scale_weight"), (torch.float8_e5m2, "weight_scale")],
)
def test_fp8_dequantised_on_load(tmp_path, fp8, scales):
    hf = hf_encoder("umt5")
    stored, dequantised = fp8_state(hf, fp8, scales)
    folder = saved(tmp_path, hf, stored)
    model = HookedT5Encoder.from_pretrained(str(folder))
    assert torch.equal(model.encoder[2].attn.k_proj, dequantised["encoder.block.2.layer.0.SelfAttention.k.weight"])
    assert torch.equal(model.W_E, dequantised["shared.weight"])
    ours, ref = last_hidden(model, hf_with(hf, dequantised))
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)  # equals HF with the dequantised weights
    _, original = last_hidden(model, hf)
    # and stays close to the original (e5m2 keeps 2 mantissa bits, e4m3 3)
    assert (ours - original).norm() / original.norm() < (0.25 if fp8 == torch.float8_e5m2 else 0.12)
    assert HookedT5Encoder.from_pretrained(str(folder), dtype="auto").W_E.dtype == torch.bfloat16


# ---- GGUF ----------------------------------------------------------------------------------------


def write_gguf(path, hf, qtype_for, arch="t5encoder"):
    """A T5 GGUF file written with the gguf package's own writer, names and quantiser, as llama.cpp's converter
    lays it out; returns `{HF name: dequantised fp32 tensor}` (what the file holds)."""
    gguf = pytest.importorskip("gguf")
    cfg = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(512)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_block_count(cfg.num_layers)
    writer.add_head_count(cfg.num_heads)
    writer.add_key_length(cfg.d_kv)
    writer.add_value_length(cfg.d_kv)
    writer.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
    writer.add_relative_attn_buckets_count(cfg.relative_attention_num_buckets)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5, cfg.num_layers)
    held = {}
    for name, w in hf.state_dict().items():
        if "embed_tokens" in name:
            continue
        array = w.float().numpy()
        qtype = qtype_for(name, array)
        if qtype == gguf.GGMLQuantizationType.F32:
            data, raw_dtype = array, None
        elif qtype == gguf.GGMLQuantizationType.F16:
            data, raw_dtype = array.astype(np.float16), None
        elif qtype == gguf.GGMLQuantizationType.Q6_K:
            data, raw_dtype = random_q6_k(array.shape), qtype  # the package has no K-quant quantiser
        else:
            data, raw_dtype = gguf.quants.quantize(array, qtype), qtype
        gguf_name = names.get_name(name.removesuffix(".weight")) + ".weight"
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
        values = data if raw_dtype is None else gguf.quants.dequantize(data, qtype)
        held[name] = torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(array.shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def random_q6_k(shape):
    """Random but valid Q6_K blocks (bytes: 128 low bits, 64 high bits, 16 int8 scales, fp16 d per 256 values)."""
    gguf = pytest.importorskip("gguf")
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q6_K]
    rows, cols = shape
    g = np.random.default_rng(0)
    data = g.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    data[..., size - 2 :] = np.frombuffer(np.float16(2e-3).tobytes(), dtype=np.uint8)
    return data.reshape(rows, cols // block * size)


def test_gguf_q8_0_f16_f32(tmp_path):
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    # Q8_0 rows are blocks of 32; GGUF stores no max_distance: every released T5 uses 128
    hf = hf_encoder("t5", d_ff=64, relative_attention_max_distance=128)

    def qtype_for(name, array):
        if array.ndim == 1 or "relative_attention_bias" in name:
            return Q.F32
        return Q.F16 if name == "shared.weight" else Q.Q8_0

    held = write_gguf(tmp_path / "t5-q8_0.gguf", hf, qtype_for)
    reader = gguf.GGUFReader(str(tmp_path / "t5-q8_0.gguf"))
    written = {t.name for t in reader.tensors}
    # llama.cpp's T5 names
    assert {
        "token_embd.weight",
        "enc.blk.0.attn_q.weight",
        "enc.blk.1.ffn_gate.weight",
        "enc.blk.1.ffn_up.weight",
        "enc.blk.0.attn_rel_b.weight",
        "enc.output_norm.weight",
    } <= written
    model = HookedT5Encoder.from_pretrained(str(tmp_path / "t5-q8_0.gguf"))
    assert model.cfg.gated_mlp and model.cfg.n_layers == hf.config.num_layers
    assert torch.equal(model.encoder[1].mlp.gate_proj, held["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"])
    ours, ref = last_hidden(model, hf_with(hf, held))
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    _, original = last_hidden(model, hf)
    assert (ours - original).norm() / original.norm() < 0.02
    with pytest.raises(ValueError, match="HookedT5Encoder"):
        HookedEncoderDecoder.from_pretrained(str(tmp_path / "t5-q8_0.gguf"))


def test_gguf_k_quant_and_bf16(tmp_path):
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    # K-quant rows are blocks of 256: d_model, inner (heads * d_kv) and d_ff multiples of 256
    hf = hf_encoder(
        "umt5", d_model=256, d_kv=64, num_heads=4, d_ff=256, num_layers=2, relative_attention_max_distance=128
    )

    def qtype_for(name, array):
        if array.ndim == 1 or "relative_attention_bias" in name:
            return Q.F32
        return Q.BF16 if name == "shared.weight" else Q.Q6_K

    held = write_gguf(tmp_path / "umt5-q6_k.gguf", hf, qtype_for)
    model = HookedT5Encoder.from_pretrained(str(tmp_path / "umt5-q6_k.gguf"))
    assert model.cfg.per_layer_position_bias
    for name, ours in (
        ("encoder.block.1.layer.0.SelfAttention.o.weight", model.encoder[1].attn.o_proj),
        ("shared.weight", model.W_E),
    ):
        assert torch.equal(ours, held[name]), name
    ours, ref = last_hidden(model, hf_with(hf, held))
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


# ---- bad files ---------------------------------------------------------------------------------------


def test_bad_files_give_one_line_errors_naming_the_file(tmp_path):
    hf = hf_encoder("t5")
    hf.save_pretrained(tmp_path / "good")
    weights = (tmp_path / "good" / "model.safetensors").read_bytes()
    # truncated safetensors (an incomplete download)
    hf.save_pretrained(tmp_path / "truncated")
    (tmp_path / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated") as err:
        HookedT5Encoder.from_pretrained(str(tmp_path / "truncated"))
    assert "\n" not in str(err.value)
    # not safetensors at all
    (tmp_path / "truncated" / "model.safetensors").write_bytes(b"<html>404</html>")
    with pytest.raises(ValueError, match=r"model\.safetensors.*not a valid safetensors"):
        HookedT5Encoder.from_pretrained(str(tmp_path / "truncated"))
    # wrong architecture
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match=r"bert.*'bert' model; supported: t5, mt5, umt5"):
        HookedT5Encoder.from_pretrained(str(bert))
    # GGUF of another family
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"llama\.gguf: a GGUF file of a 'llama' model; expected a T5") as err:
        HookedT5Encoder.from_pretrained(str(tmp_path / "llama.gguf"))
    assert "\n" not in str(err.value)
    # truncated GGUF
    held = tmp_path / "t5.gguf"
    write_gguf(held, hf_encoder("t5", d_ff=64), lambda name, array: gguf.GGMLQuantizationType.F32)
    data = held.read_bytes()
    held.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"t5\.gguf.*truncated"):
        HookedT5Encoder.from_pretrained(str(held))


# ---- streaming ------------------------------------------------------------------------------------------

MEASURE = r"""
import json, sys, torch
from t5hooks import HookedT5Encoder
sys.path.insert(0, "tests")
from peak_memory import peak_growth_bytes  # tests/peak_memory.py

path, warm_up, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
HookedT5Encoder.from_pretrained(warm_up, dtype=dtype)  # lazy imports (tokenizers, gguf) are not loading
model, grew = peak_growth_bytes(lambda: HookedT5Encoder.from_pretrained(path, dtype=dtype))
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"grew": grew, "size": size}))
"""


def peak_ratio(path, warm_up, dtype):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), str(warm_up), dtype],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(run.stdout.strip().splitlines()[-1])
    return out["grew"] / out["size"], out["size"]


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_loading_streams_peak_memory_within_1_2x_of_the_model(tmp_path):
    """A ~56 MiB (fp32) encoder, loaded in a fresh process (after a warm-up load of a small model of the same
    format, which pays the one-off costs: lazy imports, torch's thread pool): from bf16 safetensors cast to fp32, from fp8 with scales to bf16, and from a Q8_0 GGUF file to fp32;
    the peak resident memory grows by at most 1.2x the model's final size."""
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    q8 = lambda name, a: Q.F32 if a.ndim == 1 or "bias" in name else Q.Q8_0
    ratios = {}
    for size, hf in (
        # warm-up model: tensors big enough for torch's parallel copy paths (a fixed ~10 MB of thread-pool set-up)
        ("tiny", hf_encoder("t5", vocab_size=4096, d_model=64, d_ff=64, num_layers=1)),
        ("big", hf_encoder("t5", vocab_size=8192, d_model=512, d_kv=64, num_heads=8, d_ff=1024, num_layers=4)),
    ):
        bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in hf.state_dict().items() if "embed_tokens" not in k}
        saved(tmp_path, hf, bf16, f"bf16-{size}")
        saved(tmp_path, hf, fp8_state(hf, torch.float8_e4m3fn, "scale_weight")[0], f"fp8-{size}")
        write_gguf(tmp_path / f"q8-{size}.gguf", hf, q8)
    for what, name, dtype in (
        ("bf16 -> fp32", "bf16-{}", "float32"),
        ("fp8 + scales -> bf16", "fp8-{}", "bfloat16"),
        ("gguf q8_0 -> fp32", "q8-{}.gguf", "float32"),
    ):
        ratios[what] = peak_ratio(tmp_path / name.format("big"), tmp_path / name.format("tiny"), dtype)
    print({k: f"{r:.3f}x of {size / 2**20:.0f} MiB" for k, (r, size) in ratios.items()})
    for what, (ratio, _) in ratios.items():
        assert ratio <= 1.2, (what, ratio)
