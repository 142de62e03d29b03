"""Feature dashboards: every embedded number against an independent computation over the whole store (the SAE
run on all rows at once), the logit effect against the model's forward and Hugging Face's T5, bad input, and
the pages in a real headless Chromium (no console errors, the DOM shows the JSON, sorting and search work)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from headless_chromium import assert_not_blank, chromium_session, hover_text, load
from t5_fixtures import hf_t5, hooked_from

from t5hooks import HookedEncoderDecoder
from t5hooks.interventions import SAE, TopKSAE
from t5hooks.interventions.saelens_format import save_saelens
from t5hooks.store import ActivationStore, extract
from t5hooks.viz import feature_dashboard
from t5hooks.viz.dashboard import unembed_directions
from t5hooks.viz.feature_stats import FeatureStats, bucket_edges, bucket_of

ENC, DEC = "encoder.1.hook_resid_post", "decoder.1.hook_resid_post"
WORDS = "the cat sat on a mat while dogs ran far away from home".split()


def embedded(page: Path) -> dict:
    text = page.read_text(encoding="utf-8")
    return json.loads(re.search(r'<script type="application/json" id="t5hooks-data">(.*?)</script>', text, re.S)[1])


@pytest.fixture(scope="module")
def model() -> HookedEncoderDecoder:
    return HookedEncoderDecoder.from_pretrained("t5hooks-tiny")


@pytest.fixture(scope="module")
def store(model: HookedEncoderDecoder, tmp_path_factory: pytest.TempPathFactory) -> ActivationStore:
    root = tmp_path_factory.mktemp("dash")
    g = torch.Generator().manual_seed(0)
    texts = []
    for _ in range(36):
        n = int(torch.randint(2, 7, (1,), generator=g))
        texts.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)))
    src = root / "corpus.jsonl"
    src.write_text("".join(json.dumps({"q": t, "a": t[::-1][:12]}) + "\n" for t in texts))
    extract(model, src, [ENC, DEC], root / "store", field="q", decoder_field="a", window=10, backend="eager",
            progress=False)  # fmt: skip
    return ActivationStore(root / "store")


def relu_sae(d_in: int, d_sae: int, hook: str, seed: int = 1, bias: float = -0.3) -> SAE:
    sae = SAE(d_in, d_sae, seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(bias)
    sae.hook_name = hook
    return sae


@pytest.fixture(scope="module")
def encoder_site(store: ActivationStore, model, tmp_path_factory) -> tuple[Path, SAE]:
    sae = relu_sae(128, 24, ENC)
    out = tmp_path_factory.mktemp("site") / "enc"
    # small chunks: examples and their context windows cross chunk boundaries
    feature_dashboard(store, sae, out, model=model, chunk_rows=37, top_k=6, reservoir=30, quantile_bins=4,
                      per_bin=3, context=(3, 2), progress=False)  # fmt: skip
    return out, sae


def independent(store: ActivationStore, sae: SAE, hook: str) -> tuple[dict, torch.Tensor]:
    rows = store.load(hook)
    with torch.no_grad():
        feats = sae.encode(rows["acts"].reshape(len(rows["doc"]), -1))  # all rows at once, no chunking
    return rows, feats


def test_numbers_equal_an_independent_computation(store: ActivationStore, model, encoder_site) -> None:
    out, sae = encoder_site
    rows, feats = independent(store, sae, ENC)
    where = {(int(d), int(p)): i for i, (d, p) in enumerate(zip(rows["doc"], rows["pos"]))}
    doc_rows: dict[int, list[int]] = {}
    for i, d in enumerate(rows["doc"].tolist()):
        doc_rows.setdefault(d, []).append(i)
    strings = dict(enumerate(model.to_str_tokens(list(range(model.cfg.d_vocab)))))
    index = embedded(out / "index.html")
    assert [r["feature"] for r in index["features"]] == list(range(sae.d_sae))
    assert index["n_tokens"] == len(feats) == store.num_rows(ENC)
    for f in range(sae.d_sae):
        col = feats[:, f]
        active = col[col > 0]
        page = embedded(out / "features" / f"{f}.html")
        row = index["features"][f]
        assert page["n_firing"] == len(active) and page["density"] == row["density"] == len(active) / len(col)
        assert np.float32(page["max_activation"]) == pytest.approx(float(col.max()), rel=1e-6, abs=1e-7)
        assert row["max_activation"] == page["max_activation"]
        if not len(active):
            assert page["top_examples"] == [] and page["quantile_bins"] == []
            continue
        assert page["mean_activation"] == pytest.approx(float(active.double().mean()), rel=1e-5)
        assert page["min_activation"] == pytest.approx(float(active.min()), rel=1e-6)
        # top examples: the k largest activations in order, each where the store says, with its context
        top = page["top_examples"]
        expected = col.topk(min(6, len(active))).values
        assert [e["activation"] for e in top] == pytest.approx(expected.tolist(), rel=1e-6, abs=1e-7)
        assert top[0]["activation"] == page["max_activation"]
        for ex in top:
            check_example(ex, where, doc_rows, feats[:, f], rows, strings)
        # histogram: exact counts between the embedded edges
        hist = page["histogram"]
        assert sum(hist["counts"]) == len(active)
        edges = np.array(hist["edges"], dtype=np.float32)
        values = active.numpy()
        for i, count in enumerate(hist["counts"]):
            lo_ok = values >= edges[i]
            hi_ok = values <= edges[i + 1] if i == len(hist["counts"]) - 1 else values < edges[i + 1]
            assert int((lo_ok & hi_ok).sum()) == count, (f, i)
        # quantile samples: real active tokens, inside their bin
        bins = page["quantile_bins"]
        assert len(bins) == 4 and bins[0]["lo"] == page["min_activation"] and bins[-1]["hi"] == page["max_activation"]
        sampled = 0
        for b in bins:
            assert np.float32(b["lo"]) <= np.float32(b["hi"])
            for ex in b["examples"]:
                assert b["lo"] <= ex["activation"] <= b["hi"]
                check_example(ex, where, doc_rows, feats[:, f], rows, strings)
                sampled += 1
        assert min(3, len(active)) <= sampled <= 12
        # nearest features by decoder cosine
        unit = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
        cos = unit @ unit[f]
        cos[f] = -2
        ref = cos.topk(len(page["neighbours"]))
        assert [n["feature"] for n in page["neighbours"]] == ref.indices.tolist()
        assert [n["cosine"] for n in page["neighbours"]] == pytest.approx(ref.values.tolist(), abs=1e-6)
    assert embedded(out / "features" / "0.html")["logit_effect"]["note"].startswith(
        "Logit effects are shown for decoder"
    )


def check_example(ex: dict, where: dict, doc_rows: dict, col: torch.Tensor, rows: dict, strings: dict) -> None:
    """The example's activation is the feature's at (doc, pos); its tokens and shading are the document's
    (context 3 before, 2 after, cut at the document's ends)."""
    i = where[(ex["doc"], ex["pos"])]
    assert ex["activation"] == pytest.approx(float(col[i]), rel=1e-6, abs=1e-7) and ex["activation"] > 0
    mine = doc_rows[ex["doc"]]
    lo, hi = max(0, ex["pos"] - 3), min(len(mine), ex["pos"] + 3)
    assert ex["start"] == lo and len(ex["tokens"]) == hi - lo
    assert ex["tokens"] == [strings[int(rows["token_id"][mine[p]])] for p in range(lo, hi)]
    assert ex["acts"] == pytest.approx([float(col[mine[p]]) for p in range(lo, hi)], rel=1e-6, abs=1e-7)


def test_decoder_stream_sources_and_logit_effect(store: ActivationStore, model, tmp_path: Path) -> None:
    """A TopK SAE in SAELens's format, on a decoder hook: examples carry their source text, and the logit
    effect is what the model's own forward gives a final residual along the feature's decoder direction."""
    sae = TopKSAE(128, 16, k=3, seed=2)
    save_saelens(sae, tmp_path / "sae", hook_name=DEC)
    out = feature_dashboard(store, tmp_path / "sae", tmp_path / "site", model=model, top_k=4, progress=False)
    rows, feats = independent(store, sae, DEC)
    enc = store.load(ENC)
    checked = 0
    for f in range(sae.d_sae):
        page = embedded(out / "features" / f"{f}.html")
        assert page["stream"] == "decoder"
        assert np.float32(page["max_activation"]) == pytest.approx(float(feats[:, f].max()), rel=1e-6)
        for ex in page["top_examples"]:
            source = enc["token_id"][enc["doc"] == ex["doc"]].tolist()
            assert ex["source"] == model.to_str_tokens(source)
        effect = page["logit_effect"]
        # independent: the full decoder forward with the last residual replaced by the direction
        direction = sae.W_dec[f].detach()
        hook = (DEC, lambda resid, hook, d=direction: d.expand_as(resid).clone())
        with torch.no_grad():
            logits = model.run_with_hooks(torch.tensor([[5, 6, 1]]), torch.tensor([[0]]), fwd_hooks=[hook])[0, 0]
        up = logits.topk(10)
        assert [t for t, _ in effect["promoted"]] == model.to_str_tokens(up.indices.tolist())
        assert [v for _, v in effect["promoted"]] == pytest.approx(up.values.tolist(), rel=1e-5, abs=1e-5)
        down = (-logits).topk(10)
        assert [v for _, v in effect["suppressed"]] == pytest.approx((-down.values).tolist(), rel=1e-5, abs=1e-5)
        checked += 1
    assert checked == 16


@pytest.mark.parametrize("variant", ["t5_v1_0", "t5_v1_1"])
def test_logit_effect_matches_hugging_face_output_path(variant: str) -> None:
    """T5 v1.0 (tied, logits scaled by d_model**-0.5) and v1.1 (untied, unscaled): the same logits as
    Hugging Face's final layer norm and lm_head give a final residual along each direction."""
    hf = hf_t5(variant)
    model = hooked_from(hf)
    directions = torch.randn(5, hf.config.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        normed = hf.decoder.final_layer_norm(directions)
        if getattr(hf.config, "scale_decoder_outputs", hf.config.tie_word_embeddings):  # 5.x / 4.x flag
            normed = normed * hf.config.d_model**-0.5
        ref = hf.lm_head(normed)
    torch.testing.assert_close(unembed_directions(model, directions), ref, rtol=1e-5, atol=1e-5)


def test_sketch_quantiles_and_reservoir_are_uniform() -> None:
    """The log-bucket sketch counts exactly per bucket, and the reservoir is a uniform sample of active tokens."""
    g = torch.Generator().manual_seed(0)
    values = torch.exp(torch.randn(20000, generator=g) * 2)
    edges = bucket_edges()
    b = bucket_of(values)
    assert bool(((edges[b] <= values) & (values < edges[b + 1])).all())
    assert float(((edges[1:] - edges[:-1]) / edges[:-1]).max()) <= 1 / 16 + 1e-7  # relative width <= 1/16
    # reservoir: one feature active on every token, values = row index; the sample covers rows uniformly
    n, keep = 20000, 400
    stats = FeatureStats(1, top_k=3, reservoir=keep, before=0, after=0, seed=1)
    from t5hooks.viz.feature_stats import Context

    rows = torch.arange(1, n + 1, dtype=torch.float32)[:, None]
    zeros = torch.zeros(n, dtype=torch.int64)
    for s in range(0, n, 1000):
        stats.update(rows[s : s + 1000], 1000, Context(zeros, zeros.int(), zeros.int(), s, s))
    stats.compact()
    sample = stats.sample.value[0]
    assert len(sample.unique()) == keep
    counts = torch.histc(sample, bins=4, min=1, max=n)
    assert counts.min() > keep / 4 * 0.7 and counts.max() < keep / 4 * 1.3
    assert stats.top.value[0].tolist() == [n, n - 1, n - 2]


def test_bad_input(store: ActivationStore, model, tmp_path: Path) -> None:
    sae = relu_sae(128, 8, ENC)
    with pytest.raises(ValueError, match="trained on"):
        feature_dashboard(store, sae, tmp_path / "a", hook=DEC, progress=False)
    with pytest.raises(ValueError, match="holds no 'decoder.0.hook_mlp_out'"):
        feature_dashboard(store, relu_sae(128, 8, "decoder.0.hook_mlp_out"), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="d_in=64"):
        feature_dashboard(store, relu_sae(64, 8, ENC), tmp_path / "a", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no dashboard"):
        feature_dashboard(store, sae, tmp_path / "busy", progress=False)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    other = HookedEncoderDecoder.from_pretrained("t5hooks-tiny-random")
    with pytest.raises(ValueError, match="not the one that made the store"):
        feature_dashboard(store, sae, tmp_path / "a", model=other, progress=False)
    site = feature_dashboard(store, sae, tmp_path / "site", progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        feature_dashboard(store, sae, site, progress=False)
    feature_dashboard(store, sae, site, overwrite=True, features=[1, 2], progress=False)
    assert sorted(p.name for p in (site / "features").iterdir()) == ["1.html", "2.html"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    broken = tmp_path / "incomplete"
    shutil.copytree(store.path, broken)
    progress = next(broken.glob("progress-*.json"))
    state = json.loads(progress.read_text())
    state["complete"] = False
    progress.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="incomplete"):
        feature_dashboard(broken, sae, tmp_path / "b", progress=False)


# ---- in the browser -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    yield from chromium_session()


@pytest.mark.slow
def test_pages_in_chromium(browser, encoder_site, tmp_path: Path) -> None:
    out, sae = encoder_site
    from selenium.webdriver.common.by import By

    data = load(browser, out / "index.html")
    rows = browser.find_elements(By.CSS_SELECTOR, "#index tbody tr")
    assert len(rows) == len(data["features"]) == sae.d_sae
    for tr, f in zip(rows, data["features"]):  # the DOM shows the embedded numbers
        cells = tr.find_elements(By.TAG_NAME, "td")
        assert int(cells[0].text) == f["feature"]
        assert float(cells[2].get_attribute("data-value")) == f["max_activation"]
        assert float(cells[2].text) == pytest.approx(f["max_activation"], rel=1e-3)
    shown = lambda: [
        int(tr.get_attribute("data-feature")) for tr in browser.find_elements(By.CSS_SELECTOR, "#index tbody tr")
    ]
    header = browser.find_element(By.CSS_SELECTOR, 'th[data-key="max_activation"]')
    header.click()
    by_max = sorted(data["features"], key=lambda r: (-r["max_activation"], r["feature"]))
    assert shown() == [r["feature"] for r in by_max] != list(range(sae.d_sae))
    header.click()
    assert shown() == [
        r["feature"] for r in sorted(data["features"], key=lambda r: (r["max_activation"], r["feature"]))
    ]
    token = next(t for r in data["features"] for t in r["top_tokens"] if t.strip())
    browser.find_element(By.ID, "search").send_keys(token)
    assert set(shown()) == {r["feature"] for r in data["features"] if any(token in t for t in r["top_tokens"])}
    assert_not_blank(browser)

    f = max(range(sae.d_sae), key=lambda i: data["features"][i]["density"])
    page = load(browser, out / "features" / f"{f}.html")
    assert float(browser.find_element(By.ID, "stat-max").get_attribute("data-value")) == page["max_activation"]
    examples = browser.find_elements(By.CSS_SELECTOR, "#top-examples .example")
    assert [float(e.get_attribute("data-activation")) for e in examples] == [
        e["activation"] for e in page["top_examples"]
    ]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#quantile-bins .example")) == sum(
        len(b["examples"]) for b in page["quantile_bins"]
    )
    centre = examples[0].find_element(By.CSS_SELECTOR, ".tok.center")
    assert float(centre.get_attribute("data-act")) == page["top_examples"][0]["activation"]
    assert "activation" in hover_text(browser, centre)
    bars = browser.find_elements(By.CSS_SELECTOR, "#histogram div")
    assert [int(b.get_attribute("data-count")) for b in bars] == page["histogram"]["counts"]
    assert_not_blank(browser)
    browser.find_element(By.CSS_SELECTOR, "#neighbours a").click()
    assert browser.current_url.endswith(f"/{page['neighbours'][0]['feature']}.html")


@pytest.mark.slow
def test_console_errors_are_caught(browser, tmp_path: Path) -> None:
    """The console check can fail: a page whose script throws is reported."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<html><body><script>document.body.setAttribute("data-rendered", "x"); undefinedFn();</script></body></html>'
    )
    with pytest.raises(AssertionError, match="console errors"):
        load(browser, bad)


def test_cli_dashboard(store: ActivationStore, model, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`t5hooks dashboard --store --sae --out`: the model the store records is loaded and checked; the same
    numbers as the Python call; a second run needs --force; a wrong hook is a one-line input error."""
    from t5hooks.apps.cli import main

    sae = relu_sae(128, 12, ENC, seed=4)
    save_saelens(sae, tmp_path / "sae", hook_name=ENC)
    args = ["dashboard", "--store", str(store.path), "--sae", str(tmp_path / "sae"), "--out", str(tmp_path / "d")]
    assert main([*args, "--no-progress", "--top-k", "5"]) == 0
    assert "model: t5hooks-tiny (checked" in capsys.readouterr().out
    ref = feature_dashboard(store, sae, tmp_path / "ref", model=model, top_k=5, progress=False)
    for f in (0, 7):
        got, want = embedded(tmp_path / "d" / "features" / f"{f}.html"), embedded(ref / "features" / f"{f}.html")
        assert got["top_examples"] == want["top_examples"] and got["max_activation"] == want["max_activation"]
    assert main([*args, "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*args, "--no-progress", "--force", "--hook", DEC]) == 2
    assert "trained on" in capsys.readouterr().err
