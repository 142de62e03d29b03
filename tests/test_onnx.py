"""ONNX export and ONNX Runtime: parity with eager at new shapes, patches, exporter pitfalls, fp16,
the fused-attention fallback, runner/exporter errors, and the `t5hooks export` command."""

import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from t5_fixtures import random_batch
from transformers.models.t5.modeling_t5 import T5Attention

import t5hooks.kernels.op as kernel_op
from t5hooks import HookedEncoderDecoder, HookedT5Config
from t5hooks.apps.cli import main as cli_main
from t5hooks.apps.commands import export as command
from t5hooks.export import OnnxRunner, to_onnx
from t5hooks.export.onnx import external_data_files, name_graph_io
from t5hooks.export.ort import _resolve_shape

D_MODEL, VOCAB, BUCKETS, MAX_DISTANCE = 16, 40, 8, 16
CAPTURE = [
    "encoder.0.attn.rel_pos_hook",
    "decoder.0.attn.rel_pos_hook",  # distance-0 buckets
    "encoder.0.hook_resid_mid",  # replaced by a patch and captured: the output is the patch input
    "encoder.*.hook_resid_pre",
    "encoder.*.hook_resid_post",  # encoder.0.hook_resid_post is encoder.1.hook_resid_pre
    "decoder.*.hook_resid_pre",
    "decoder.*.hook_resid_post",
    "decoder.1.hook_mlp_out",  # "add"-patched and captured
    "decoder.*.cross_attn.hook_pattern",
    "decoder.1.attn.hook_attn_scores",
    "hook_encoder_out",
]
PATCH = {"encoder.0.hook_resid_mid": "replace", "decoder.1.hook_mlp_out": "add"}


def tiny(n_layers=2, n_decoder_layers=2, **overrides):
    """Few layers: export time grows with the number of traced ops."""
    cfg = HookedT5Config(
        d_model=D_MODEL,
        d_head=4,
        n_heads=2,
        d_mlp=24,
        n_layers=n_layers,
        n_decoder_layers=n_decoder_layers,
        d_vocab=VOCAB,
        relative_attention_num_buckets=BUCKETS,
        relative_attention_max_distance=MAX_DISTANCE,
        seed=0,
        **overrides,
    )
    return HookedEncoderDecoder(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    path = to_onnx(model, tmp_path_factory.mktemp("onnx") / "t5.onnx", CAPTURE, list(PATCH), patch_mode=PATCH)
    return path, OnnxRunner(path)


def inputs(batch, enc, dec, seed=5, vector_add=False):
    tokens, mask, dec_tokens, dec_mask = random_batch(VOCAB, batch, enc, dec, seed=seed, pad_decoder=True)
    g = torch.Generator().manual_seed(seed)
    add = torch.randn(D_MODEL, generator=g) if vector_add else torch.randn(1, 1, D_MODEL, generator=g)
    patches = {"encoder.0.hook_resid_mid": torch.randn(batch, enc, D_MODEL, generator=g), "decoder.1.hook_mlp_out": add}
    return tokens, dec_tokens, mask, dec_mask, patches


# ---- graph structure -------------------------------------------------------------------------------


@pytest.mark.slow
def test_graph_io_names_and_checker(model, exported):
    path, runner = exported
    graph = onnx.load(str(path)).graph
    onnx.checker.check_model(str(path))
    names = model.capture(CAPTURE).names
    assert [o.name for o in graph.output] == ["logits", *names]
    assert [i.name for i in graph.input] == [
        "input",
        "decoder_input",
        "one_zero_attention_mask",
        "decoder_attention_mask",
        "patch.encoder.0.hook_resid_mid",
        "patch.decoder.1.hook_mlp_out",
    ]
    assert runner.output_names == ["logits", *names]
    shapes = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}
    assert shapes["logits"] == ["batch", "decoder", VOCAB]
    assert shapes["decoder.1.cross_attn.hook_pattern"] == ["batch", 2, "decoder", "encoder"]
    assert shapes["encoder.0.attn.rel_pos_hook"] == [1, 2, "encoder", "encoder"]


@pytest.mark.slow
def test_same_tensor_under_two_names_gets_two_outputs(exported):
    path, runner = exported
    producers = {out: node for node in onnx.load(str(path)).graph.node for out in node.output}
    for a, b in [
        ("encoder.0.hook_resid_post", "encoder.1.hook_resid_pre"),
        ("decoder.0.hook_resid_post", "decoder.1.hook_resid_pre"),
    ]:
        assert producers[a] is not producers[b]  # two values, each produced by its own node
        assert "Identity" in (producers[a].op_type, producers[b].op_type)
    tokens, dec, mask, dec_mask, patches = inputs(2, 6, 3)
    out = runner(tokens, dec, mask, dec_mask, patches=patches)
    np.testing.assert_array_equal(out["encoder.0.hook_resid_post"], out["encoder.1.hook_resid_pre"])
    np.testing.assert_array_equal(out["decoder.0.hook_resid_post"], out["decoder.1.hook_resid_pre"])


@pytest.mark.slow
def test_output_that_is_an_input(exported):
    path, runner = exported
    producers = {out: node for node in onnx.load(str(path)).graph.node for out in node.output}
    node = producers["encoder.0.hook_resid_mid"]
    assert node.op_type == "Identity" and list(node.input) == ["patch.encoder.0.hook_resid_mid"]
    tokens, dec, mask, dec_mask, patches = inputs(3, 5, 2)
    out = runner(tokens, dec, mask, dec_mask, patches=patches)
    np.testing.assert_array_equal(out["encoder.0.hook_resid_mid"], patches["encoder.0.hook_resid_mid"].numpy())


def test_name_graph_io_moves_colliding_internal_names(tmp_path):
    # Hand-built graph with every pitfall: an internal value already named "logits", one value wanted
    # under two output names, and an output that is the graph input itself.
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([3]))
    relu = ir.node("Relu", [x])
    relu.outputs[0].name = "logits"
    neg = ir.node("Neg", [relu.outputs[0]])
    neg.outputs[0].name = "copy"
    for v in (relu.outputs[0], neg.outputs[0]):
        v.type, v.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([3])
    graph = ir.Graph([x], [neg.outputs[0], neg.outputs[0], x], nodes=[relu, neg], opset_imports={"": 18}, name="g")
    name_graph_io(graph, ["input"], ["logits", "copy", "echo"])
    path = tmp_path / "names.onnx"
    ir.save(ir.Model(graph, ir_version=10), path)
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "copy", "echo"]
    value = np.array([-1.0, 0.0, 2.0], dtype=np.float32)
    logits, copy, echo = session.run(None, {"input": value})
    np.testing.assert_array_equal(logits, -np.maximum(value, 0))
    np.testing.assert_array_equal(copy, logits)
    np.testing.assert_array_equal(echo, value)


# ---- numerics ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("batch,enc,dec", [(1, 9, 1), (3, 4, 6), (3, 13, 11)])
def test_parity_with_eager_at_new_shapes(model, exported, batch, enc, dec):
    _, runner = exported
    tokens, dec_tokens, mask, dec_mask, patches = inputs(batch, enc, dec, vector_add=batch == 3)
    expected = model.capture(CAPTURE, patch=list(PATCH), patch_mode=PATCH)(tokens, dec_tokens, mask, dec_mask, patches)
    got = runner(tokens.numpy(), dec_tokens.numpy(), mask.numpy(), dec_mask.numpy(), patches=patches)
    assert list(got) == list(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value.detach().numpy(), atol=1e-4, rtol=0, err_msg=name)
        # what the CUDA path preallocates from the input sizes
        assert (
            _resolve_shape(runner.output_shapes[name], {"batch": batch, "encoder": enc, "decoder": dec})
            == got[name].shape
        )


@pytest.mark.slow
def test_patches_match_eager_hooks(model, exported):
    """ORT with patch inputs == the plain model with Python hooks doing the same replace / add."""
    _, runner = exported
    tokens, dec_tokens, mask, dec_mask, patches = inputs(2, 7, 4, seed=9)
    hooks = [
        ("encoder.0.hook_resid_mid", lambda x, hook: patches["encoder.0.hook_resid_mid"]),
        ("decoder.1.hook_mlp_out", lambda x, hook: x + patches["decoder.1.hook_mlp_out"]),
    ]
    with torch.no_grad():
        expected = model.run_with_hooks(
            tokens, dec_tokens, "logits", mask, decoder_attention_mask=dec_mask, fwd_hooks=hooks
        )
        unpatched = model(tokens, dec_tokens, "logits", mask, decoder_attention_mask=dec_mask)
    got = runner(tokens, dec_tokens, mask, dec_mask, patches=patches)["logits"]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=0)
    assert np.abs(got - unpatched.numpy()).max() > 1e-2  # the patches did something


@pytest.mark.slow
def test_runner_fills_masks_and_decoder_start(model, exported):
    _, runner = exported
    tokens = torch.randint(3, VOCAB, (2, 5))
    patches = {"encoder.0.hook_resid_mid": torch.zeros(2, 5, D_MODEL), "decoder.1.hook_mlp_out": torch.zeros(D_MODEL)}
    got = runner(input=tokens, patches=patches)
    expected = model.capture(CAPTURE, patch=list(PATCH), patch_mode=PATCH)(tokens, patches=patches)
    assert got["logits"].shape == (2, 1, VOCAB)  # decoder_input defaulted to the start token
    np.testing.assert_allclose(got["logits"], expected["logits"].detach().numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_distance_zero_buckets_have_no_inf_or_nan(model, exported, tmp_path):
    """Every Log in the graph sees finite input at distance 0 (q_len = k_len = 1 and diagonals), and the
    position bias equals the table looked up with Hugging Face's bucketing."""
    path, _ = exported
    proto = onnx.load(str(path))
    logs = [node.output[0] for node in proto.graph.node if node.op_type == "Log"]
    assert logs, "the bucket computation should contain a Log"
    for name in logs:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe = tmp_path / "logs.onnx"
    onnx.save(proto, str(probe))
    session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for batch, enc, dec in [(1, 1, 1), (2, 3, 1), (1, 40, 2)]:
        tokens, dec_tokens, mask, dec_mask, patches = inputs(batch, enc, dec)
        feeds = {
            "input": tokens.numpy(),
            "decoder_input": dec_tokens.numpy(),
            "one_zero_attention_mask": mask.numpy(),
            "decoder_attention_mask": dec_mask.numpy(),
            "patch.encoder.0.hook_resid_mid": patches["encoder.0.hook_resid_mid"].numpy(),
            "patch.decoder.1.hook_mlp_out": patches["decoder.1.hook_mlp_out"].numpy(),
        }
        out = dict(zip(names, session.run(None, feeds)))
        for name in names:
            value = out[name]
            if name.endswith("hook_attn_scores"):  # masked keys score -inf (as TransformerLens), never NaN / +inf
                value = np.where(value == -np.inf, 0.0, value)
            assert np.isfinite(value).all(), f"{name} not finite at batch {batch}, enc {enc}, dec {dec}"
        for stack, length, bidirectional in (("encoder", enc, True), ("decoder", dec, False)):
            pos = torch.arange(length)
            buckets = T5Attention._relative_position_bucket(
                pos[None, :] - pos[:, None], bidirectional=bidirectional, num_buckets=BUCKETS, max_distance=MAX_DISTANCE
            )
            table = getattr(model, stack)[0].attn.rel_bias_table.detach()
            expected = table[buckets].permute(2, 0, 1)[None].numpy()
            np.testing.assert_array_equal(out[f"{stack}.0.attn.rel_pos_hook"], expected)


# ---- fp16, external data, fused-attention fallback ----------------------------------------------------


@pytest.mark.slow
def test_fp16_external_data_and_fused_attention_falls_back_while_exporting(tmp_path, monkeypatch):
    """attn_impl="fused" routes attention through `relbias_attention`; while exporting it must pick the
    reference (standard ONNX ops). The fp16 graph with external weights runs and is close to fp32 eager."""
    model = tiny(n_layers=1, n_decoder_layers=1, attn_impl="fused")
    calls = []
    original = kernel_op.use_kernels

    def spy(backend, q):
        chose = original(backend, q)
        calls.append((torch.compiler.is_exporting(), chose))
        return chose

    monkeypatch.setattr(kernel_op, "use_kernels", spy)
    capture = ["decoder.0.hook_resid_post", "hook_encoder_out"]
    path = to_onnx(model, tmp_path / "fp16.onnx", capture, dtype="float16", external_data=True)
    exporting = [chose for during_export, chose in calls if during_export]
    assert exporting and not any(exporting)  # the fused entry point ran while exporting and fell back
    (data,) = external_data_files(path)  # fp16.onnx.<random>.data, new on every save
    assert data.stat().st_size > 0
    proto = onnx.load(str(path), load_external_data=False)
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}  # no custom ops
    runner = OnnxRunner(path)
    assert runner.inputs["input"].dtype == np.int64
    tokens, mask, dec, dec_mask = random_batch(VOCAB, 3, 6, 4, seed=2)
    got = runner(tokens, dec, mask, dec_mask)
    with torch.no_grad():
        expected = model.capture(capture)(tokens, dec, mask, dec_mask)
    for name, value in expected.items():
        assert got[name].dtype == np.float16
        scale = float(value.abs().max())
        np.testing.assert_allclose(
            got[name].astype(np.float32), value.detach().numpy(), atol=1e-2 * scale, rtol=0, err_msg=name
        )


# ---- errors --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_runner_rejects_bad_inputs_clearly(exported):
    _, runner = exported
    tokens, dec, mask, dec_mask, patches = inputs(2, 5, 3)
    with pytest.raises(ValueError, match=r"unknown input 'decoder_inputs' \(did you mean 'decoder_input'\?\)"):
        runner(tokens, decoder_inputs=dec, patches=patches)
    with pytest.raises(ValueError, match=r"missing patches for \['decoder.1.hook_mlp_out'\]"):
        runner(tokens, dec, patches={"encoder.0.hook_resid_mid": patches["encoder.0.hook_resid_mid"]})
    with pytest.raises(ValueError, match=r"no patch input for 'decoder.0.hook_mlp_out'.*decoder.1.hook_mlp_out"):
        runner(tokens, dec, patches={**patches, "decoder.0.hook_mlp_out": patches["decoder.1.hook_mlp_out"]})
    with pytest.raises(TypeError, match="input must hold integer token ids, got dtype float32"):
        runner(tokens.float(), dec, patches=patches)
    with pytest.raises(TypeError, match="patch.encoder.0.hook_resid_mid must be floating point"):
        integer_patch = torch.zeros(2, 5, D_MODEL, dtype=torch.long)
        runner(tokens, dec, patches={**patches, "encoder.0.hook_resid_mid": integer_patch})
    with pytest.raises(
        ValueError,
        match=r"input has rank 1 \(shape \(5,\)\); expected rank 2: "
        r"input: int64\[batch, encoder\]",
    ):
        runner(tokens[0], dec, patches=patches)
    with pytest.raises(
        ValueError,
        match=r"one_zero_attention_mask axis 1 \('encoder'\) has size 4 but input has "
        r"'encoder' = 5",
    ):
        runner(tokens, dec, mask[:, :4], patches=patches)
    with pytest.raises(ValueError, match="fixes it to 16"):
        runner(tokens, dec, patches={**patches, "encoder.0.hook_resid_mid": torch.zeros(2, 5, 8)})
    with pytest.raises(ValueError, match=rf"input has token ids in \[0, {VOCAB}\]; valid ids are 0..{VOCAB - 1}"):
        runner(tokens.clone().index_fill_(1, torch.tensor([0]), VOCAB), dec, patches=patches)


def test_runner_takes_numpy_patches_and_refuses_empty_inputs_as_eager_does(model, exported):
    _, runner = exported
    tokens, dec, mask, dec_mask, patches = inputs(2, 5, 3, seed=4)
    as_numpy = {name: p.numpy() for name, p in patches.items()}
    np.testing.assert_allclose(
        runner(tokens.numpy(), dec.numpy(), mask.numpy(), dec_mask.numpy(), patches=as_numpy)["logits"],
        runner(tokens, dec, mask, dec_mask, patches=patches)["logits"],
        atol=0,
        rtol=0,
    )
    cap = model.capture(CAPTURE, patch=list(PATCH), patch_mode=PATCH)
    with torch.no_grad():  # the eager capture module takes the same numpy patches
        eager = cap(tokens, dec, mask, dec_mask, patches=as_numpy)["logits"]
    np.testing.assert_allclose(runner(tokens, dec, mask, dec_mask, patches=patches)["logits"], eager, atol=1e-4)
    for empty in (tokens[:, :0], tokens[:0]):
        message = r"input must have shape \[batch, pos\] with batch, pos >= 1"
        with pytest.raises(ValueError, match=message):
            model(empty)
        with pytest.raises(ValueError, match=message):
            runner(empty, patches=patches)


def test_exporter_rejects_bad_names_and_paths(model, tmp_path):
    with pytest.raises(ValueError, match="no hook point matches 'encoder.0.hook_resid_psot'; did you mean"):
        to_onnx(model, tmp_path / "a.onnx", ["encoder.0.hook_resid_psot"])
    with pytest.raises(ValueError, match="directory .*missing.* does not exist"):
        to_onnx(model, tmp_path / "missing" / "a.onnx")
    with pytest.raises(ValueError, match="must end in .onnx"):
        to_onnx(model, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="export dtype='bfloat16' is not supported; valid: float32, float16"):
        to_onnx(model, tmp_path / "a.onnx", dtype="bfloat16")
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        OnnxRunner(tmp_path / "absent.onnx")


# ---- the command -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A one-layer Hugging Face T5 saved with `save_pretrained`: the command loads it with --model."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=4,
        d_ff=24,
        num_heads=2,
        num_layers=1,
        num_decoder_layers=1,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )
    directory = tmp_path_factory.mktemp("checkpoint")
    T5ForConditionalGeneration(cfg).eval().save_pretrained(directory)
    return directory


def export_command(*args):
    """`t5hooks export ...` in a fresh process (the installed entry point is `t5hooks.apps.cli:main`)."""
    return subprocess.run(
        [sys.executable, "-m", "t5hooks.apps.cli", "export", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("pt2", ".pt2")])
def test_export_command_writes_and_verifies(checkpoint, tmp_path, fmt, suffix):
    out = tmp_path / f"model{suffix}"
    result = export_command(
        "--format",
        fmt,
        "--model",
        str(checkpoint),
        "--capture",
        "decoder.*.hook_resid_post",
        "encoder.0.attn.hook_pattern",
        "--patch",
        "decoder.0.hook_mlp_out",
        "--patch-mode",
        "add",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "matches eager on a fresh input" in result.stdout and out.is_file()


@pytest.mark.slow
def test_export_command_fails_cleanly_on_bad_input(checkpoint, tmp_path):
    result = export_command(
        "--model", str(checkpoint), "--capture", "decoder.*.hook_resid_psot", "--out", str(tmp_path / "m.onnx")
    )
    assert result.returncode == 2
    assert result.stderr.startswith("t5hooks export: error: no hook point matches 'decoder.*.hook_resid_psot'")
    assert "Traceback" not in result.stderr and not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_export_command_reports_a_mismatch_and_keeps_the_previous_file(checkpoint, tmp_path, capsys, monkeypatch):
    """A file that disagrees with eager (a corrupted loader here): exit status 1, one line naming the outputs that
    differ, and the file already at --out is left as it was (no temporary file either)."""
    real = command._load_written

    def corrupted(*args, **kwargs):
        run = real(*args, **kwargs)
        return lambda *inputs: {k: v + (1.0 if k == "logits" else 0.0) for k, v in run(*inputs).items()}

    monkeypatch.setattr(command, "_load_written", corrupted)
    out = tmp_path / "m.pt"
    out.write_bytes(b"previous export")
    args = ["export", "--format", "torchscript", "--model", str(checkpoint), "--capture", "hook_encoder_out"]
    code = cli_main([*args, "--out", str(out), "--force"])
    err = capsys.readouterr().err
    assert code == 1 and "disagrees with eager" in err and "logits: max |diff| 1.000e+00" in err
    assert "hook_encoder_out" not in err  # only the output that differs is listed
    assert len(err.strip().splitlines()) == 1 and f"the previous {out} is kept" in err
    assert out.read_bytes() == b"previous export" and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_export_command_checks_paths_before_loading(tmp_path, capsys):
    assert cli_main(["export", "--format", "pt2", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "t5hooks export: error: --out" in capsys.readouterr().err
    assert cli_main(["export", "--out", str(tmp_path / "no" / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    for bad in ("-1", "nan", "inf"):
        assert cli_main(["export", "--atol", bad, "--out", str(tmp_path / "m.onnx")]) == 2
        assert "--atol must be a finite number >= 0" in capsys.readouterr().err
    (tmp_path / "m.onnx").write_bytes(b"keep")
    assert cli_main(["export", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "m.onnx").read_bytes() == b"keep"
