"""Activation store: extraction against run_with_cache, SIGKILL at every commit point then resumption, bad input, sources, reading back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t5hooks import HookedEncoderDecoder, HookedT5Config
from t5hooks.store import ActivationStore, extract
from t5hooks.store.batching import padded_tokens, plan_batches
from t5hooks.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ["encoder.*.hook_resid_post", "decoder.1.hook_mlp_out", "decoder.0.cross_attn.hook_k", "hook_encoder_out"]


def corpus(n: int = 30, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "theta", "kappa", "iota", "mu"]
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 12, (1,), generator=g))
        out.append(" ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g)))
    return out


@pytest.fixture(scope="module")
def model() -> HookedEncoderDecoder:
    return HookedEncoderDecoder.from_pretrained("t5hooks-tiny")


def shard_tensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {p.name: load_file(p) for p in sorted(path.glob("shard-*.safetensors"))}


def test_plan_batches_respects_budget_and_covers_every_prompt() -> None:
    lengths = [5, 100, 3, 40, 41, 7, 300, 2, 2, 60]
    batches = plan_batches(lengths, token_budget=128)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 128
    assert [300] in [[lengths[i] for i in b] for b in batches]  # longer than the budget: alone
    unsorted = padded_tokens(lengths, [list(range(0, 5)), list(range(5, 10))])
    assert padded_tokens(lengths, batches) < unsorted
    assert plan_batches(lengths, 128) == batches
    with pytest.raises(ValueError, match="token_budget"):
        plan_batches(lengths, 0)


def test_token_stream(model: HookedEncoderDecoder) -> None:
    assert model.layout.token_stream("encoder.1.hook_resid_post") == "encoder"
    assert (
        model.layout.token_stream("hook_embed") == "encoder"
        and model.layout.token_stream("hook_encoder_out") == "encoder"
    )
    assert model.layout.token_stream("decoder.0.cross_attn.hook_k") == "encoder"
    assert model.layout.token_stream("decoder.0.cross_attn.hook_q") == "decoder"
    assert (
        model.layout.token_stream("hook_decoder_embed") == "decoder"
        and model.layout.token_stream("unembed.hook_in") == "decoder"
    )
    from t5hooks.capture import EncoderCaptureModule  # what extract runs for encoder-stack hooks

    with pytest.raises(ValueError, match="computed by the decoder"):
        EncoderCaptureModule(model, ["hook_embed", "decoder.0.cross_attn.hook_k"])
    for name in ("encoder.0.attn.hook_pattern", "decoder.1.cross_attn.hook_attn_scores", "encoder.0.attn.rel_pos_hook"):
        with pytest.raises(ValueError, match="not a per-token"):
            model.layout.token_stream(name)


def test_rows_equal_run_with_cache(model: HookedEncoderDecoder, tmp_path: Path) -> None:
    """Every stored row (encoder, decoder and cross-attention hooks, teacher-forced decoder targets) equals
    run_with_cache on that prompt alone at the same position; only real tokens are stored."""
    texts = corpus(20)
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"q": t, "a": t[::-1][:9]}) + "\n" for t in texts))
    summary = extract(
        model, src, HOOKS, tmp_path / "store", field="q", decoder_field="a", window=8, token_budget=96,
        backend="eager", progress=False,
    )  # fmt: skip
    assert summary.prompts == 20 and summary.shards_written == 3
    store = ActivationStore(tmp_path / "store")
    assert store.complete and set(store.names) == {
        "encoder.0.hook_resid_post", "encoder.1.hook_resid_post", "hook_encoder_out",
        "decoder.0.cross_attn.hook_k", "decoder.1.hook_mlp_out",
    }  # fmt: skip
    tok = model.tokenizer
    loaded = {name: store.load(name) for name in store.names}
    for doc, text in enumerate(texts):
        enc = torch.tensor([tok.encode(text)])
        labels = tok.encode(text[::-1][:9])
        dec = torch.tensor([[model.cfg.decoder_start_token_id, *labels[:-1]]])
        _, cache = model.run_with_cache(enc, dec, names_filter=store.names)
        for name, rows in loaded.items():
            sel = rows["doc"] == doc
            ref_tokens = enc[0] if store.axis(name) == "encoder" else dec[0]
            assert rows["pos"][sel].tolist() == list(range(len(ref_tokens)))  # no padding rows, none missing
            assert rows["token_id"][sel].tolist() == ref_tokens.tolist()
            torch.testing.assert_close(rows["acts"][sel], cache[name][0], atol=2e-5, rtol=1e-5)
    assert store.num_rows("hook_encoder_out") == summary.real_tokens


def test_file_sources_agree_with_a_list(model: HookedEncoderDecoder, tmp_path: Path) -> None:
    """A text file and a JSONL file give the same rows as the prompts as a list."""
    texts = corpus(12, seed=1)
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ref = rows_of(model, texts, tmp_path / "list")
    for label in ("c.txt", "c.jsonl"):
        rows = rows_of(model, tmp_path / label, tmp_path / f"store-{label}")
        assert all(torch.equal(rows[k], ref[k]) for k in ref), label


def test_datasets_sources_agree_with_a_list(model: HookedEncoderDecoder, tmp_path: Path) -> None:
    """A `datasets` Dataset object, and its save_to_disk directory streamed: the same rows as a list."""
    datasets = pytest.importorskip("datasets")  # the `store` extra
    texts = corpus(12, seed=1)
    ref = rows_of(model, texts, tmp_path / "list")
    ds = datasets.Dataset.from_dict({"text": texts})
    ds.save_to_disk(str(tmp_path / "saved"))
    for label, source, streaming in (("object", ds, False), ("streamed", str(tmp_path / "saved"), True)):
        rows = rows_of(model, source, tmp_path / label, streaming=streaming)
        assert all(torch.equal(rows[k], ref[k]) for k in ref), label


def rows_of(model: HookedEncoderDecoder, source: object, out: Path, **kw: object) -> dict[str, torch.Tensor]:
    extract(model, source, "encoder.1.hook_resid_post", out, window=5, token_budget=80, backend="eager",
            progress=False, **kw)  # fmt: skip
    return ActivationStore(out).load("encoder.1.hook_resid_post")


def test_storage_dtypes_and_encoder_only_hooks(model: HookedEncoderDecoder, tmp_path: Path) -> None:
    texts = corpus(6, seed=2)
    extract(model, texts, "hook_encoder_out", tmp_path / "f32", backend="eager", progress=False)
    ref = ActivationStore(tmp_path / "f32").load("hook_encoder_out")  # the encoder alone ran (no decoder hook)
    for doc, text in enumerate(texts):
        _, cache = model.run_with_cache(text, names_filter="hook_encoder_out")
        torch.testing.assert_close(ref["acts"][ref["doc"] == doc], cache["hook_encoder_out"][0])
    for dtype in ("bf16", "float16"):
        extract(model, texts, "hook_encoder_out", tmp_path / dtype, dtype=dtype, backend="eager", progress=False)
        store = ActivationStore(tmp_path / dtype)
        rows = store.load("hook_encoder_out")
        assert rows["acts"].dtype == store.dtype == {"bf16": torch.bfloat16, "float16": torch.float16}[dtype]
        torch.testing.assert_close(rows["acts"].float(), ref["acts"], atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match="storage dtype"):
        extract(model, texts, "hook_encoder_out", tmp_path / "bad", dtype="int8", progress=False)


@pytest.mark.parametrize("backend", ["eager", pytest.param("onnx", marks=pytest.mark.slow)])
def test_encoder_only_model_stores_what_the_encoder_decoder_stores(backend: str, tmp_path: Path) -> None:
    """A HookedT5Encoder (a text encoder) extracts the same rows as the encoder-decoder it was cut from;
    its ONNX graph takes no decoder input."""
    from t5hooks import HookedT5Encoder

    full = one_layer_model()
    encoder = HookedT5Encoder(full.cfg, tokenizer=full.tokenizer)
    encoder.load_state_dict({k: v for k, v in full.state_dict().items() if not HookedT5Encoder.discards(k)})
    texts, names = corpus(8, seed=4), ["hook_embed", "encoder.0.hook_resid_post"]
    kw = dict(window=4, token_budget=256, progress=False)
    extract(full, texts, names, tmp_path / "full", backend="eager", **kw)
    extract(encoder.eval(), texts, names, tmp_path / "encoder", backend=backend, **kw)
    ref, got = ActivationStore(tmp_path / "full"), ActivationStore(tmp_path / "encoder")
    for name in names:
        want, rows = ref.load(name), got.load(name)
        assert torch.equal(rows["doc"], want["doc"]) and torch.equal(rows["pos"], want["pos"])
        torch.testing.assert_close(rows["acts"], want["acts"], atol=1e-5, rtol=1e-5)


def one_layer_model() -> HookedEncoderDecoder:
    """A 1+1-layer byte-level model: compiling and exporting it is quick."""
    cfg = HookedT5Config(
        d_model=32, d_head=8, n_heads=4, d_mlp=64, n_layers=1, d_vocab=259, act_fn="gelu_new", gated_mlp=True,
        tie_word_embeddings=False, scale_logits=False, seed=0,
    )  # fmt: skip
    return HookedEncoderDecoder(cfg, tokenizer=ByteTokenizer()).eval()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["compile", "onnx"])
def test_compiled_and_onnx_backends_equal_eager(backend: str, tmp_path: Path) -> None:
    model = one_layer_model()
    texts = corpus(16, seed=3)
    names = ["encoder.0.hook_resid_post", "decoder.0.hook_resid_post", "decoder.0.cross_attn.hook_v"]
    kw = dict(window=8, token_budget=1024, progress=False)  # one batch of 8 per window: one dynamic graph
    extract(model, texts, names, tmp_path / "eager", backend="eager", **kw)
    ref = ActivationStore(tmp_path / "eager")
    extract(model, texts, names, tmp_path / backend, backend=backend, **kw)
    stores = {name: ActivationStore(tmp_path / backend) for name in names}
    if backend == "compile":  # encoder hooks only: the compiled encoder stack alone (CaptureModule.encode)
        extract(model, texts, names[:1], tmp_path / "encoder_only", backend=backend, **kw)
        stores["encoder.0.hook_resid_post"] = ActivationStore(tmp_path / "encoder_only")
    for name, store in stores.items():
        got, want = store.load(name), ref.load(name)
        assert torch.equal(got["doc"], want["doc"]) and torch.equal(got["pos"], want["pos"])
        torch.testing.assert_close(got["acts"], want["acts"], atol=1e-4, rtol=1e-4)


# The child loads the model once, counts the commit points of an uninterrupted extraction (renames of a finished
# temporary file onto its final name: manifest, then per window its shard and the progress file, then the final
# progress file), then for each one forks a process that runs the same extraction with atomic's rename patched to
# SIGKILL it just before that rename (and one just after the last). It reports how each process ended.
KILL_CHILD = """
import os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from t5hooks import HookedEncoderDecoder, atomic
from t5hooks.store import extract

model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny")
corpus, root = sys.argv[1], Path(sys.argv[2])
names = ["encoder.*.hook_resid_post", "decoder.0.hook_resid_post"]
real_rename = atomic._rename

def run(out, kill_before=None, kill_after=None):
    count = [0]
    def rename(src, dst):
        count[0] += 1
        if count[0] == kill_before:
            os.kill(os.getpid(), signal.SIGKILL)
        real_rename(src, dst)
        if count[0] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    atomic._rename = rename
    extract(model, corpus, names, out, window=6, token_budget=64, backend="eager", progress=False)
    atomic._rename = real_rename
    return count[0]

total = run(root / "counted")
points = [("before", i) for i in range(1, total + 1)] + [("after", total)]
for when, i in points:
    pid = os.fork()
    if pid == 0:
        run(root / f"{when}-{i}", **{f"kill_{when}": i})
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(f"{when}-{i}", os.WTERMSIG(status) if os.WIFSIGNALED(status) else "exit", flush=True)
"""


@pytest.mark.slow
def test_sigkill_at_every_commit_point_then_resume_equals_uninterrupted(
    model: HookedEncoderDecoder, tmp_path: Path
) -> None:
    """Killed just before each rename that commits a file (and after the last), the same call finishes the store,
    which equals an uninterrupted run byte for byte (shards, progress records, manifest); no temporary file stays."""
    (tmp_path / "c.txt").write_text("\n".join(corpus(26, seed=4)) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", KILL_CHILD, str(tmp_path / "c.txt"), str(tmp_path)]
    child = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    ended = dict(line.split() for line in child.stdout.splitlines())
    assert len(ended) == 13 and set(ended.values()) == {"9"}, ended  # 5 windows: 12 commit points, each killed
    names = ["encoder.*.hook_resid_post", "decoder.0.hook_resid_post"]
    kw = dict(window=6, token_budget=64, backend="eager", progress=False)
    straight = tmp_path / "counted"

    def files(path: Path) -> dict[str, object]:
        out: dict[str, object] = {p.name: json.loads(p.read_text()) for p in path.glob("*.json")}
        for name, tensors in shard_tensors(path).items():
            out[name] = tensors
        return out

    want = files(straight)
    for point in ended:
        out = tmp_path / point
        extract(model, tmp_path / "c.txt", names, out, **kw)
        got = files(out)
        assert got.keys() == want.keys(), point
        for name, value in want.items():
            if isinstance(value, dict) and name.endswith(".safetensors"):
                assert all(torch.equal(got[name][k], v) for k, v in value.items()), (point, name)
            else:
                assert got[name] == value, (point, name)
        assert not [p.name for p in out.iterdir() if ".tmp-" in p.name], point
    again = extract(model, tmp_path / "c.txt", names, straight, **kw)  # complete: nothing to do
    assert again.shards_written == 0 and again.windows_resumed == 5


def test_bad_input_is_a_clear_error_and_keeps_shards(model: HookedEncoderDecoder, tmp_path: Path) -> None:
    texts = corpus(20, seed=5)
    texts[13] = ""
    src = tmp_path / "c.txt"
    src.write_text("\n".join(texts) + "\n")
    out = tmp_path / "store"
    kw = dict(window=5, token_budget=64, backend="eager", progress=False)
    with pytest.raises(ValueError, match=r"prompt 13 \(line 14\) is empty.*skip_empty"):
        extract(model, src, "encoder.0.hook_resid_post", out, **kw)
    before = shard_tensors(out)
    assert len(before) == 2  # windows 0 and 1 finished before the bad one
    # a different hook set, a different model, a foreign directory: refused, nothing touched
    with pytest.raises(ValueError, match=r"different settings(.|\n)*hooks"):
        extract(model, src, "encoder.1.hook_resid_post", out, **kw)
    other = HookedEncoderDecoder(model.cfg, tokenizer=model.tokenizer)  # same config, other weights
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.encoder[1].mlp.out_proj.mul_(1.01)
    with pytest.raises(ValueError, match="weights_sample_sha256"):
        extract(other, src, "encoder.0.hook_resid_post", out, **kw)
    with pytest.raises(ValueError, match="source"):
        extract(model, texts[:-1], "encoder.0.hook_resid_post", out, **kw)
    after = shard_tensors(out)
    assert after.keys() == before.keys() and all(
        torch.equal(after[s][k], before[s][k]) for s in before for k in before[s]
    )
    # continuing with --skip-empty is allowed and finishes the store
    summary = extract(model, src, "encoder.0.hook_resid_post", out, skip_empty=True, **kw)
    assert summary.skipped_empty == 1 and summary.windows_resumed == 2
    store = ActivationStore(out)
    assert 13 not in store.load("encoder.0.hook_resid_post")["doc"].tolist()

    long = ["short", "x" * 50]
    with pytest.raises(ValueError, match=r"prompt 1 \(line 2\) has 51 tokens > max_tokens=20.*truncate"):
        extract(model, long, "hook_embed", tmp_path / "long", max_tokens=20, **kw)
    extract(model, long, "hook_embed", tmp_path / "long", max_tokens=20, truncate=True, **kw)
    rows = ActivationStore(tmp_path / "long").load("hook_embed")
    assert (rows["doc"] == 1).sum() == 20 and rows["token_id"][-1] == model.tokenizer.eos_token_id

    with pytest.raises(ValueError, match="hook_resid_pots"):
        extract(model, long, "encoder.0.hook_resid_pots", tmp_path / "unknown", **kw)
    assert not (tmp_path / "unknown").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no t5hooks store"):
        extract(model, long, "hook_embed", foreign, **kw)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="not a per-token"):
        extract(model, long, "encoder.0.attn.hook_pattern", tmp_path / "pattern", **kw)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(model: HookedEncoderDecoder, tmp_path: Path) -> None:
    """`torchrun --nproc_per_node=2 ... t5hooks extract` (gloo, CPU): each rank writes its own slice; together
    they hold exactly the rows of a one-process run."""
    (tmp_path / "c.txt").write_text("\n".join(corpus(24, seed=7)) + "\n")
    hooks = ["encoder.1.hook_resid_post", "decoder.0.hook_attn_out"]
    args = ["extract", str(tmp_path / "c.txt"), str(tmp_path / "two"), "--hooks", *hooks]
    args += ["--backend", "eager", "--window", "5", "--token-budget", "64", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = subprocess.run([*cmd, "-m", "t5hooks.apps.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=180)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    two = ActivationStore(tmp_path / "two")
    assert two.complete and two.world_size == 2 and {s["rank"] for s in two.shards} == {0, 1}
    extract(model, tmp_path / "c.txt", hooks, tmp_path / "one", window=5, token_budget=64, backend="eager",
            progress=False)  # fmt: skip
    one = ActivationStore(tmp_path / "one")
    for name in hooks:
        a, b = one.load(name), two.load(name)  # both sorted by (doc, pos)
        for column in ("doc", "pos", "token_id"):
            assert torch.equal(a[column], b[column])
        torch.testing.assert_close(a["acts"], b["acts"], atol=1e-5, rtol=1e-5)


def test_bench_extract_quick_runs_and_outputs_agree(capsys: pytest.CaptureFixture[str]) -> None:
    from t5hooks.apps.bench.extract import main

    assert main(["--quick", "--backend", "eager", "--prompts", "24"]) == 0  # exit 1 if the outputs disagree
    out = capsys.readouterr().out
    assert "speed-up:" in out and "same outputs: max |extract - HF hooks|" in out


def test_cli_extract(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from t5hooks.apps.cli import main

    (tmp_path / "c.txt").write_text("first prompt\n\nthird one\n")
    args = ["extract", str(tmp_path / "c.txt"), str(tmp_path / "out"), "--hooks", "encoder.*.hook_mlp_out"]
    args += ["--backend", "eager", "--no-progress", "--dtype", "bf16"]
    assert main(args) == 2
    assert "prompt 1 (line 2) is empty" in capsys.readouterr().err
    assert main([*args, "--skip-empty"]) == 0
    assert "extracted 2 prompts, 23 real tokens" in capsys.readouterr().out
    store = ActivationStore(tmp_path / "out")
    assert store.dtype == torch.bfloat16 and store.load("encoder.1.hook_mlp_out")["doc"].unique().tolist() == [0, 2]
