"""The three kinds of views on the embedded t5hooks-tiny model (it reverses lowercase words), end to end:

    extract -> train sae -> dashboard,  an attention view,  an encoder residual patching map

    python examples/viz_gallery.py OUT_DIR [--screenshots docs/img]

Writes OUT_DIR/acts (the store), OUT_DIR/saes (SAELens folders), OUT_DIR/dash (the dashboard site),
OUT_DIR/attention.html and OUT_DIR/patching.html; with --screenshots, PNGs of each view taken by headless Chromium
(the README's pictures). Runs offline in a few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

HOOK = "decoder.1.hook_resid_post"


def build(out: Path) -> dict[str, Path]:
    from t5hooks import HookedEncoderDecoder
    from t5hooks.analysis.patching import patch_residual
    from t5hooks.apps.cli import main
    from t5hooks.store import extract
    from t5hooks.viz import feature_dashboard

    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10))) for _ in range(600)]
    corpus = out / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": w, "target": w[::-1]}) + "\n" for w in words))
    # 1. extract: the decoder residual stream, teacher-forced on the reversed words (and the encoder's, for the source)
    extract(model, corpus, [HOOK, "encoder.1.hook_resid_post"], out / "acts", decoder_field="target",
            backend="eager", progress=False)  # fmt: skip
    # 2. train an SAE on the same hook (live, on the reversal task), saved in SAELens's format
    if main(["train", "sae", "--hook", HOOK, "--out", str(out / "saes"), "--steps", "200", "--d-sae", "64", "--k", "4",
             "--no-compile"]):  # fmt: skip
        raise SystemExit("t5hooks train sae failed")
    # 3. the dashboard
    feature_dashboard(out / "acts", out / "saes" / HOOK, out / "dash", model=model, overwrite=True, progress=False)
    # an attention view and a patching map
    model.attention_view("interpret", "terpretni").save(out / "attention.html")
    tokens = model.to_tokens(["interpret", "interprez"], move_to_device=False)
    dec = model.to_decoder_tokens(["terpretni"], move_to_device=False)
    target = int(dec[0, 1])  # "t", the first letter of the answer: the last letter of the input
    result = patch_residual(model, (tokens[:1], dec), (tokens[1:], dec), lambda logits: logits[:, 0, target].mean(),
                            stack="encoder")  # fmt: skip
    result.view().save(out / "patching.html")
    return {
        "index": out / "dash" / "index.html",
        "attention": out / "attention.html",
        "patching": out / "patching.html",
    }


def screenshots(pages: dict[str, Path], folder: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from headless_chromium import chromium_session, load
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    folder.mkdir(parents=True, exist_ok=True)
    session = chromium_session()
    driver = next(session)
    driver.set_window_size(1000, 640)

    def shot(name: str) -> None:
        path = folder / f"{name}.png"
        path.write_bytes(driver.get_screenshot_as_png())
        Image.open(path).convert("RGB").quantize(colors=96).save(path, optimize=True)
        print(path, path.stat().st_size, "bytes")

    index = load(driver, pages["index"])
    driver.find_element(By.CSS_SELECTOR, 'th[data-key="max_activation"]').click()
    shot("dashboard-index")
    busiest = max(index["features"], key=lambda f: f["density"] if f["density"] < 0.5 else 0)
    load(driver, pages["index"].parent / "features" / f"{busiest['feature']}.html")
    shot("dashboard-feature")
    load(driver, pages["attention"])
    Select(driver.find_element(By.ID, "attn-kind")).select_by_value("cross")
    Select(driver.find_element(By.ID, "attn-layer")).select_by_visible_text("L1")
    shot("attention")
    load(driver, pages["patching"])
    shot("patching")
    next(session, None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--screenshots", type=Path, default=None, help="folder for PNGs of each view")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    pages = build(args.out)
    for name, page in pages.items():
        print(f"{name}: {page}")
    if args.screenshots is not None:
        screenshots(pages, args.screenshots)
