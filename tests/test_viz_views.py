"""Attention views and patching maps: the embedded numbers against the cache and the patching result, padded
positions hidden, and the pages in a real headless Chromium (no console errors, the DOM shows the JSON, picking
heads changes the heatmap, hover shows labels and values, the screenshot is not blank)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
import torch
from headless_chromium import assert_not_blank, chromium_session, hover_text, load

from t5hooks import HookedEncoderDecoder
from t5hooks.analysis.lens import head_logit_attribution
from t5hooks.analysis.patching import patch_heads

CLEAN, CORRUPT = "hello world", "jello world"


@pytest.fixture(scope="module")
def model() -> HookedEncoderDecoder:
    return HookedEncoderDecoder.from_pretrained("t5hooks-tiny")


@pytest.fixture(scope="module")
def attention(model: HookedEncoderDecoder):
    """Example 1 of a right-padded batch: its padding must not show."""
    view = model.attention_view(["hello world", "hi"], ["dlrow olleh", "ih"], batch_index=1)
    return view


def test_attention_view_embeds_the_cached_patterns(model: HookedEncoderDecoder, attention) -> None:
    tokens, mask = model.to_tokens(["hello world", "hi"], move_to_device=False), None
    mask = (tokens != 0).long()
    dec = model.to_decoder_tokens(["dlrow olleh", "ih"], move_to_device=False)
    dec_mask = torch.ones_like(dec)
    dec_mask[1, 3:] = 0  # "<pad> i h" then padding (the decoder starts with the pad id: mask by length)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, dec, one_zero_attention_mask=mask, decoder_attention_mask=dec_mask)
    data = attention.data
    assert data["tokens"] == {"encoder": ["h", "i", "</s>"], "decoder": ["<pad>", "i", "h"]}
    assert data["positions"] == {"encoder": [0, 1, 2], "decoder": [0, 1, 2]}
    assert set(data["attention"]) == {"encoder", "decoder", "cross"}
    for kind, name in (
        ("encoder", "encoder.{}.attn"),
        ("decoder", "decoder.{}.attn"),
        ("cross", "decoder.{}.cross_attn"),
    ):
        assert data["attention"][kind]["layers"] == [0, 1]
        for layer in (0, 1):
            ref = cache[f"{name.format(layer)}.hook_pattern"][1, :, :3, :3]  # [H, Q, K] of the real tokens
            got = torch.tensor(data["attention"][kind]["patterns"][layer])
            assert torch.equal(got.float(), ref.float()), (kind, layer)  # float32 round trip is exact
    # the cache's own view, for the same example, agrees; bad masks and missing patterns are loud
    view = cache.attention_view(tokens, dec, batch_index=1, attention_mask=mask, decoder_attention_mask=dec_mask)
    assert view.data == data | {"title": "Attention"}
    with pytest.raises(ValueError, match="mask has"):
        cache.attention_view(tokens, dec, attention_mask=mask[:, :3])
    _, no_patterns = model.run_with_cache(tokens, dec, names_filter="*.hook_resid_post")
    with pytest.raises(ValueError, match="no attention patterns"):
        no_patterns.attention_view()
    frame = attention._repr_html_()
    assert frame.startswith("<iframe srcdoc=") and "t5hooks-data" in html.unescape(frame)


def test_patching_map_embeds_the_result(model: HookedEncoderDecoder) -> None:
    tok = model.to_tokens([CLEAN, CORRUPT], move_to_device=False)
    dec = model.to_decoder_tokens(["dlrow olleh"], move_to_device=False)
    answer = int(dec[0, 1])
    metric = lambda logits: logits[:, 0, answer].mean()
    result = patch_heads(model, (tok[:1], dec), (tok[1:], dec), metric)
    data = result.view().data
    assert torch.equal(torch.tensor(data["values"]), result.values.float())  # exact float32 round trip
    assert torch.equal(torch.tensor(data["normalized"]), result.normalized().float())
    assert (data["row_axis"], data["col_axis"]) == ("layer", "head")
    assert data["clean_metric"] == pytest.approx(result.clean_metric, rel=1e-6)
    assert data["corrupted_metric"] == pytest.approx(result.corrupted_metric, rel=1e-6)
    assert embedded(result.html()) == data
    _, cache = model.run_with_cache(tok[:1], dec)
    grid = head_logit_attribution(model, cache, answer, attn="cross", pos=0)
    assert torch.equal(torch.tensor(embedded(grid.html())["values"]), grid.values.float())
    assert grid.view().data["normalized"] is None and grid.view().data["row_axis"] == "layer"


def embedded(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="t5hooks-data">(.*?)</script>', page, re.S)[1])


# ---- in the browser -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    yield from chromium_session()


CELLS = "return Array.from(document.querySelectorAll('#heatmap td.cell')).map(td => Number(td.dataset.value))"


@pytest.mark.slow
def test_attention_page_in_chromium(browser, attention, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    data = load(browser, attention.save(tmp_path / "attn.html"))
    pattern = lambda kind, layer, head: [v for row in data["attention"][kind]["patterns"][layer][head] for v in row]
    assert browser.execute_script(CELLS) == pattern("encoder", 0, 0)  # head 0 of layer 0 first
    heads = browser.find_elements(By.CSS_SELECTOR, "#attn-heads input")
    assert len(heads) == data["n_heads"] == 4
    heads[0].click()  # off
    heads[2].click()  # on: head 2 alone
    assert browser.execute_script(CELLS) == pattern("encoder", 0, 2) != pattern("encoder", 0, 0)
    heads[3].click()  # heads 2 and 3: their mean
    mean = [(a + b) / 2 for a, b in zip(pattern("encoder", 0, 2), pattern("encoder", 0, 3))]
    assert browser.execute_script(CELLS) == pytest.approx(mean, rel=1e-6)
    Select(browser.find_element(By.ID, "attn-kind")).select_by_value("cross")
    Select(browser.find_element(By.ID, "attn-layer")).select_by_visible_text("L1")
    assert browser.execute_script(CELLS) == pytest.approx(
        [(a + b) / 2 for a, b in zip(pattern("cross", 1, 2), pattern("cross", 1, 3))], rel=1e-6
    )
    rows = browser.find_elements(By.CSS_SELECTOR, "#heatmap th.row")
    assert [r.text for r in rows] == ["0:<pad>", "1:i", "2:h"]  # decoder queries, padding hidden
    cell = browser.find_element(By.CSS_SELECTOR, '#heatmap td.cell[data-row="2"][data-col="1"]')
    text = hover_text(browser, cell)
    assert "cross-attention" in text and 'query 2:"h"' in text and 'key 1:"i"' in text
    assert float(text.rsplit(" ", 1)[1]) == pytest.approx(float(cell.get_attribute("data-value")), rel=1e-3)
    assert_not_blank(browser)


@pytest.mark.slow
def test_patching_page_in_chromium(browser, model: HookedEncoderDecoder, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    tok = model.to_tokens([CLEAN, CORRUPT], move_to_device=False)
    dec = model.to_decoder_tokens(["dlrow olleh"], move_to_device=False)
    answer = int(dec[0, 1])
    result = patch_heads(model, (tok[:1], dec), (tok[1:], dec), lambda logits: logits[:, 0, answer].mean())
    data = load(browser, result.view().save(tmp_path / "patching.html"))
    flat = lambda grid: [v for row in grid for v in row]
    assert browser.execute_script(CELLS) == flat(data["values"])
    assert float(browser.find_element(By.ID, "clean-metric").get_attribute("data-value")) == data["clean_metric"]
    cell = browser.find_element(By.CSS_SELECTOR, '#heatmap td.cell[data-row="1"][data-col="2"]')
    text = hover_text(browser, cell)
    assert "layer L1" in text and "head H2" in text and "patched metric" in text
    assert float(text.rsplit(" ", 1)[1]) == pytest.approx(data["values"][1][2], rel=1e-3, abs=1e-6)
    Select(browser.find_element(By.ID, "heatmap-view")).select_by_value("normalized")
    assert browser.execute_script(CELLS) == flat(data["normalized"])
    assert_not_blank(browser)


def test_cli_view_attention(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from t5hooks.apps.cli import main

    out = tmp_path / "attn.html"
    assert main(["view", "attention", "hello world", "dlrow olleh", "--out", str(out), "--layers", "1"]) == 0
    data = embedded(out.read_text())
    assert {k: v["layers"] for k, v in data["attention"].items()} == {"encoder": [1], "decoder": [1], "cross": [1]}
    assert "".join(data["tokens"]["encoder"]) == "hello world</s>"
    assert main(["view", "attention", "hi", "--out", str(out)]) == 2  # exists: needs --force
    assert "--force" in capsys.readouterr().err
    assert main(["view", "attention", "hi", "--out", str(out), "--force", "--encoder-only"]) == 0
    assert set(embedded(out.read_text())["attention"]) == {"encoder"}
