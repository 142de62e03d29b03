"""Quantised checkpoints: each supported int8 / fp8 layout loads to the weights it means, every other non-float
tensor is refused by name before anything is loaded.

Each layout is written here as its exporter writes it (tensor names, dtypes, shapes: compressed-tensors int8
per channel / per group with zero points, bitsandbytes LLM.int8 `SCB`, optimum-quanto `weight._data` /
`weight._scale`, block-wise fp8 `weight_scale_inv`), and the expected weights come from an independent
dequantisation in numpy float64 (broadcasting written out per layout). The loaded model is then compared with
Hugging Face's own T5 encoder holding those expected weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from t5_fixtures import hf_encoder, random_batch

from t5hooks import HookedT5Encoder
from t5hooks.checkpoint_checks import CheckpointError

MATRIX = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o", "wi_0", "wi_1", "wo")


def is_matrix(name: str) -> bool:
    return any(f"{m}.weight" in name for m in MATRIX)


def int8_rows(w: np.ndarray, groups: int = 1, asymmetric: bool = False):
    """Round-to-nearest int8 of `w` [out, in] in `groups` column groups: (q, scale [out, groups], zero)."""
    out, cols = w.shape
    g = w.reshape(out, groups, cols // groups)
    if asymmetric:
        lo, hi = g.min(axis=2), g.max(axis=2)
        scale = (hi - lo) / 255.0
        zero = np.round(-128 - lo / scale).astype(np.int8)
        q = np.clip(np.round(g / scale[..., None]) + zero[..., None], -128, 127)
    else:
        scale = np.abs(g).max(axis=2) / 127.0
        zero = None
        q = np.clip(np.round(g / scale[..., None]), -127, 127)
    return q.reshape(out, cols).astype(np.int8), scale.astype(np.float32), zero


def expected_grouped(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
    """(q - zero) * scale with scale / zero [out, G] each repeated over in/G columns (float64)."""
    reps = q.shape[1] // scale.shape[1]
    s = np.repeat(scale.astype(np.float64), reps, axis=1)
    z = 0.0 if zero is None else np.repeat(zero.astype(np.float64), reps, axis=1)
    return (q.astype(np.float64) - z) * s


def write(tmp_path, hf, stored: dict, name="ckpt", quantization_config=None):
    folder = tmp_path / name
    hf.save_pretrained(folder)
    if quantization_config is not None:
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (folder / "config.json").write_text(json.dumps(config))
    save_file({k: torch.as_tensor(v).contiguous() for k, v in stored.items()}, folder / "model.safetensors")
    return folder


def check_loaded(folder, hf, expected: dict[str, np.ndarray]):
    """The model equals the expected weights and computes what HF's T5 computes with them."""
    model = HookedT5Encoder.from_pretrained(str(folder))
    ours = dict(model.named_parameters())
    q = model.encoder[1].attn.q_proj
    np.testing.assert_allclose(
        q.detach().numpy(), expected["encoder.block.1.layer.0.SelfAttention.q.weight"], rtol=1e-6, atol=1e-8
    )
    np.testing.assert_allclose(
        model.encoder[2].mlp.out_proj.detach().numpy(),
        expected["encoder.block.2.layer.1.DenseReluDense.wo.weight"],
        rtol=1e-6,
        atol=1e-8,
    )
    reference = hf_encoder("t5")
    missing, unexpected = reference.load_state_dict(
        {k: torch.tensor(v, dtype=torch.float32) for k, v in expected.items()}, strict=False
    )
    assert not unexpected and all("embed_tokens" in m for m in missing)
    tokens, mask, _, _ = random_batch(model.cfg.d_vocab, 2, 9, 1)
    with torch.no_grad():
        got = model(tokens, mask)
        want = reference(input_ids=tokens, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert len(ours) > 0
    return model


def quantised_state(hf, quantise):
    """`quantise(name, w) -> (stored tensors, expected float64 weight)` applied to every matrix."""
    stored, expected = {}, {}
    for name, w in hf.state_dict().items():
        if "embed_tokens" in name:
            continue
        w = w.numpy().astype(np.float32)
        if is_matrix(name):
            tensors, value = quantise(name, w)
            stored.update(tensors)
            expected[name] = value
        else:
            stored[name] = w
            expected[name] = w.astype(np.float64)
    return stored, expected


def test_int8_weight_scale_per_row_compressed_tensors(tmp_path):
    """The issue's case: int8 `q_proj` with a per-row `weight_scale` (W8A16) loaded dequantised, not as raw ints."""
    hf = hf_encoder("t5")

    def quantise(name, w):
        q, scale, _ = int8_rows(w)
        module = name.removesuffix(".weight")
        return {name: q, f"{module}.weight_scale": scale.astype(np.float16)}, expected_grouped(
            q, scale.astype(np.float16), None
        )

    stored, expected = quantised_state(hf, quantise)
    folder = write(
        tmp_path, hf, stored, quantization_config={"quant_method": "compressed-tensors", "format": "int-quantized"}
    )
    model = check_loaded(folder, hf, expected)
    assert float(model.encoder[0].attn.q_proj.abs().max()) < 10  # not raw integers (up to 127)


def test_int8_groups_with_zero_points(tmp_path):
    hf = hf_encoder("t5")

    def quantise(name, w):
        q, scale, zero = int8_rows(w, groups=w.shape[1] // 8, asymmetric=True)
        module = name.removesuffix(".weight")
        return (
            {name: q, f"{module}.weight_scale": scale, f"{module}.weight_zero_point": zero},
            expected_grouped(q, scale, zero),
        )

    stored, expected = quantised_state(hf, quantise)
    check_loaded(write(tmp_path, hf, stored), hf, expected)


def test_bitsandbytes_int8(tmp_path):
    hf = hf_encoder("t5")

    def quantise(name, w):
        absmax = np.abs(w).max(axis=1).astype(np.float32)
        q = np.round(w * (127.0 / absmax[:, None])).astype(np.int8)
        module = name.removesuffix(".weight")
        value = q.astype(np.float64) * (absmax.astype(np.float64)[:, None] / 127.0)
        return {name: q, f"{module}.SCB": absmax, f"{module}.weight_format": np.array(0, dtype=np.uint8)}, value

    stored, expected = quantised_state(hf, quantise)
    check_loaded(
        write(tmp_path, hf, stored, quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True}),
        hf,
        expected,
    )
    # a non-row-major bitsandbytes layout is refused, naming the flag
    stored["encoder.block.0.layer.0.SelfAttention.q.weight_format"] = np.array(1, dtype=np.uint8)
    with pytest.raises(CheckpointError, match=r"q\.weight_format = 1: only bitsandbytes' row-major"):
        HookedT5Encoder.from_pretrained(str(write(tmp_path, hf, stored, name="col")))


@pytest.mark.parametrize("data_dtype", [torch.int8, torch.float8_e4m3fn])
def test_optimum_quanto_8bit(tmp_path, data_dtype):
    hf = hf_encoder("t5")

    def quantise(name, w):
        limit = 127.0 if data_dtype == torch.int8 else 448.0
        scale = (np.abs(w).max(axis=1, keepdims=True) / limit).astype(np.float32)  # [out, 1], axis 0
        data = torch.tensor(w / scale)
        data = data.round().to(torch.int8) if data_dtype == torch.int8 else data.to(data_dtype)
        value = data.float().numpy().astype(np.float64) * scale.astype(np.float64)
        module = name.removesuffix(".weight")
        return (
            {f"{name}._data": data, f"{name}._scale": scale, f"{module}.input_scale": np.ones((), np.float32),
             f"{module}.output_scale": np.ones((), np.float32)},
            value,
        )  # fmt: skip

    stored, expected = quantised_state(hf, quantise)
    check_loaded(write(tmp_path, hf, stored), hf, expected)


def test_fp8_block_scales_weight_scale_inv(tmp_path):
    hf = hf_encoder("t5")

    def quantise(name, w):
        out, cols = w.shape
        r, c = out // 16, cols // 16  # 16 x 16 blocks
        blocks = w.reshape(r, 16, c, 16)
        scale = (np.abs(blocks).max(axis=(1, 3)) / 448.0).astype(np.float32)  # [r, c]
        full = np.kron(scale, np.ones((16, 16), np.float32))
        q = torch.tensor(w / full).to(torch.float8_e4m3fn)
        value = q.float().numpy().astype(np.float64) * np.kron(scale.astype(np.float64), np.ones((16, 16)))
        return {name: q, f"{name}_scale_inv": scale}, value

    stored, expected = quantised_state(hf, quantise)
    check_loaded(write(tmp_path, hf, stored), hf, expected)


def test_scale_in_another_shard_of_a_pickle_checkpoint(tmp_path):
    """bitsandbytes int8 as sharded `pytorch_model.bin`, one weight's SCB in the other shard."""
    hf = hf_encoder("t5")
    q_name = "encoder.block.0.layer.0.SelfAttention.q.weight"
    stored, expected = {}, {}
    for name, w in hf.state_dict().items():
        if "embed_tokens" in name:
            continue
        w = w.numpy()
        if name == q_name:
            absmax = np.abs(w).max(axis=1).astype(np.float32)
            q = np.round(w * (127.0 / absmax[:, None])).astype(np.int8)
            stored[name], stored[name.replace(".weight", ".SCB")] = torch.tensor(q), torch.tensor(absmax)
            expected[name] = q.astype(np.float64) * (absmax.astype(np.float64)[:, None] / 127.0)
        else:
            stored[name], expected[name] = torch.tensor(w), w.astype(np.float64)
    folder = tmp_path / "bin"
    hf.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    names = sorted(stored)
    second = {q_name.replace(".weight", ".SCB")}
    shards = {"a.bin": [n for n in names if n not in second], "b.bin": sorted(second)}
    for file, keys in shards.items():
        torch.save({k: stored[k] for k in keys}, folder / file)
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    check_loaded(folder, hf, expected)


# ---- refusals ------------------------------------------------------------------------------------------------

Q = "encoder.block.0.layer.0.SelfAttention.q"


def damaged(hf, change):
    stored = {k: v.contiguous() for k, v in hf.state_dict().items() if "embed_tokens" not in k}
    change(stored)
    return stored


@pytest.mark.parametrize(
    "change,match",
    [
        # int8 weights with no scale: the silent load of raw integers
        (lambda s: s.update({f"{Q}.weight": s[f"{Q}.weight"].mul(100).round().to(torch.int8)}),
         rf"{Q}\.weight is int8 with no scale tensor"),
        # a scale under a name no exporter uses
        (lambda s: s.update({f"{Q}.weight": s[f"{Q}.weight"].to(torch.int8), f"{Q}.weight_scales": torch.ones(32)}),
         rf"{Q}\.weight is int8 with no scale tensor.*{Q}\.weight_scales is a quantisation tensor"),
        # scale shape mismatch (31 rows for a 32-row weight)
        (lambda s: s.update({f"{Q}.weight": s[f"{Q}.weight"].to(torch.int8), f"{Q}.weight_scale": torch.ones(31)}),
         rf"{Q}\.weight_scale has shape \[31\], which does not fit its weight \[32, 32\]"),
        # a group grid that does not divide the columns
        (lambda s: s.update({f"{Q}.weight": s[f"{Q}.weight"].to(torch.int8), f"{Q}.weight_scale": torch.ones(32, 5)}),
         rf"{Q}\.weight_scale has shape \[32, 5\]"),
        # a zero point whose shape differs from its scale
        (lambda s: s.update({f"{Q}.weight": s[f"{Q}.weight"].to(torch.int8), f"{Q}.weight_scale": torch.ones(32, 1),
                             f"{Q}.weight_zero_point": torch.zeros(32, 4, dtype=torch.int8)}),
         rf"{Q}\.weight_zero_point has shape \[32, 4\], which does not match its scale"),
        # a scale beside a float weight: which of the two is meant?
        (lambda s: s.update({f"{Q}.weight_scale": torch.ones(32)}), rf"{Q}\.weight_scale scales {Q}\.weight, which is stored as float32"),
        # bitsandbytes SCB of the wrong length
        (lambda s: s.update({f"{Q}.weight": s[f"{Q}.weight"].to(torch.int8), f"{Q}.SCB": torch.ones(16)}),
         rf"{Q}\.SCB has shape \[16\]"),
        # packed 4-bit layouts: refused by name
        (lambda s: s.update({f"{Q}.qweight": torch.zeros(4, 32, dtype=torch.int32), f"{Q}.scales": torch.ones(1, 32)}),
         rf"{Q}\.qweight belongs to a GPTQ / AWQ packed 4-bit layout"),
        (lambda s: s.update({f"{Q}.weight": torch.zeros(512, 1, dtype=torch.uint8), f"{Q}.weight.absmax": torch.ones(16)}),
         r"bitsandbytes 4-bit"),
        # quanto data without its scale
        (lambda s: s.update({f"{Q}.weight._data": s.pop(f"{Q}.weight").to(torch.int8)}), rf"{Q}\.weight\._data has no {Q}\.weight\._scale"),
        # a float8 scale (scales are float32 / float16 / bfloat16)
        (lambda s: s.update({f"{Q}.weight": s[f"{Q}.weight"].to(torch.int8), f"{Q}.weight_scale": torch.ones(32).to(torch.float8_e4m3fn)}),
         rf"{Q}\.weight_scale is float8_e4m3fn, expected a float scale"),
    ],
)  # fmt: skip
def test_tensors_without_a_known_meaning_are_refused_by_name(tmp_path, change, match):
    hf = hf_encoder("t5")
    folder = write(tmp_path, hf, damaged(hf, change))
    with pytest.raises(CheckpointError, match=match) as err:
        HookedT5Encoder.from_pretrained(str(folder))
    message = str(err.value)
    assert "\n" not in message and str(folder) in message
    assert "supported: float weights" in message and "bitsandbytes int8" in message


def test_the_declared_quantisation_method_is_quoted(tmp_path):
    hf = hf_encoder("t5")
    stored = damaged(hf, lambda s: s.update({f"{Q}.qweight": torch.zeros(4, 32, dtype=torch.int32)}))
    folder = write(tmp_path, hf, stored, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(CheckpointError, match=r"quant_method 'gptq'"):
        HookedT5Encoder.from_pretrained(str(folder))


def test_integer_tensors_in_gguf_are_refused(tmp_path):
    gguf = pytest.importorskip("gguf")
    from test_weight_formats import write_gguf

    def qtype(name, array):
        return gguf.GGMLQuantizationType.F32

    hf = hf_encoder("t5", d_ff=64)
    path = tmp_path / "ints.gguf"
    write_gguf(path, hf, qtype)
    # rewrite with one integer tensor: the gguf writer stores int8 arrays as I8
    reader = gguf.GGUFReader(str(path))
    writer = gguf.GGUFWriter(str(tmp_path / "i8.gguf"), "t5encoder")
    for field in reader.fields.values():
        if (
            field.name.startswith(("t5encoder.", "tokenizer."))
            and field.types
            and field.types[0] != gguf.GGUFValueType.ARRAY
        ):
            writer.add_key_value(field.name, field.contents(), field.types[0])
    for t in reader.tensors:
        data = np.array(t.data).reshape(tuple(reversed(t.shape.tolist())))
        if t.name == "enc.blk.0.attn_q.weight":
            data = np.round(data * 100).astype(np.int8)
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        CheckpointError, match=r"i8\.gguf: tensor 'enc\.blk\.0\.attn_q\.weight' is stored as plain integers \(I8\)"
    ):
        HookedT5Encoder.from_pretrained(str(tmp_path / "i8.gguf"))
