"""Every ```python snippet in README.md runs.

The snippets run in order, in one namespace (a later snippet may use what an earlier one defined), in a
temporary working directory, on the embedded model: every Hugging Face hub name ("org/name" strings, "t5-*",
"google/*", ...) passed to `from_pretrained` becomes "t5hooks-tiny". Names a snippet may use without
defining them (README readers have their own data) are predefined here from that model, so snippets can stay
short; see `PREDEFINED`. A snippet that needs anything else must define it itself.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# from_pretrained("<anything with a slash, or a known hub family>") -> the embedded model
HUB_NAME = re.compile(r"""from_pretrained\(\s*(["'])(?:[\w.-]+/[\w.-]+|t5-[\w-]+|google/[\w.-]+)\1""")

PREDEFINED = """
model: t5hooks-tiny;  tokens, mask [2, E]: two texts, encoder ids and mask;  dec, dec_mask [2, D]: decoder ids
(start token + text) and mask;  labels [2, D]: targets;  answer_ids [2]: one answer token per example;
steer, steering_vector, probe_direction [d_model];  clean, corrupted: two texts of equal token length;
metric(logits) -> scalar
"""


def snippets() -> list[str]:
    return SNIPPET.findall(README.read_text())


def namespace() -> dict:
    from t5hooks import HookedEncoderDecoder

    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny")
    torch.manual_seed(0)
    tokens, mask = model.to_tokens(["hello", "hooks"])
    dec = model.to_decoder_tokens(["olle", "skoo"])
    labels = torch.cat([dec[:, 1:], torch.ones_like(dec[:, :1])], dim=1)  # the decoder input shifted left + EOS
    d_model = model.cfg.d_model

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1].log_softmax(-1).max(-1).values.mean()

    return dict(
        model=model,
        tokens=tokens,
        mask=mask,
        dec=dec,
        dec_mask=torch.ones_like(dec),
        labels=labels,
        answer_ids=torch.tensor([ord("h") + 3, ord("h") + 3]),
        steer=torch.randn(d_model),
        steering_vector=torch.randn(d_model),
        probe_direction=torch.randn(d_model),
        clean="the cat",
        corrupted="the dog",
        metric=metric,
    )


def runnable(source: str) -> str:
    return HUB_NAME.sub('from_pretrained("t5hooks-tiny"', source)


def test_readme_has_snippets():
    assert len(snippets()) >= 3
    assert HUB_NAME.search('from_pretrained("google/flan-t5-small")')


@pytest.mark.slow  # compiles, exports ONNX and a generator: ~2 min on a loaded 2-core machine
def test_readme_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = namespace()
    for i, source in enumerate(snippets()):
        code = compile(runnable(source), f"README.md snippet {i + 1}", "exec")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                exec(code, scope)  # noqa: S102 - the README's own code
            except Exception as err:
                pytest.fail(f"README snippet {i + 1} failed: {type(err).__name__}: {err}\n---\n{source}")
