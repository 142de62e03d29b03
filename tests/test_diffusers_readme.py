"""README "Diffusion text encoders" runs as written on a tiny random Flux pipeline.

Its snippets are fenced ```py (not ```python: tests/test_readme.py runs those on the embedded t5hooks-tiny model,
which has no pipeline). The hub name in them becomes a tiny Flux pipeline directory (whose default image size is 16 px);
`prompts.txt` (the reader's corpus) is written here; the ```bash command runs as a subprocess of the `t5hooks`
command line.
"""

from __future__ import annotations

import functools
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

from diffusers_fixtures import WORDS, flux_pipeline, saved  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HEADING = "### Diffusion text encoders: inside a diffusers pipeline"
HUB_NAME = "black-forest-labs/FLUX.1-schnell"


def section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(HEADING)
    end = text.index("\n### ", start + len(HEADING))
    return text[start:end]


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", section(), re.S | re.M)


def test_section_has_the_workflow():
    py, bash = blocks("py"), blocks("bash")
    assert len(py) == 2 and len(bash) == 1
    assert all(HUB_NAME in b for b in (py[0], bash[0]))
    assert "--encoder-only" in bash[0] and "as_text_encoder()" in py[0] and "train_sae" in py[1]


@pytest.mark.slow  # two tiny bf16 Flux generations per step of the workflow, an extraction, an SAE, an ONNX export
def test_workflow_runs_as_written(tmp_path, monkeypatch):
    from diffusers import FluxPipeline

    pipeline_dir = saved(flux_pipeline(), tmp_path / "flux")
    init = FluxPipeline.__init__

    @functools.wraps(init)  # diffusers reads the components from the signature
    def tiny_default_size(self, *args, **kwargs):  # the tiny pipeline's default image: 16 px, not Flux's 1024
        init(self, *args, **kwargs)
        self.default_sample_size = 16

    monkeypatch.setattr(FluxPipeline, "__init__", tiny_default_size)
    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)
    Path("prompts.txt").write_text("\n".join(" ".join(rng.choices(WORDS, k=rng.randint(4, 9))) for _ in range(400)))
    first, second = (b.replace(HUB_NAME, str(pipeline_dir)) for b in blocks("py"))
    scope: dict = {}
    exec(compile(first, "README.md diffusion snippet 1", "exec"), scope)

    command = shlex.split(blocks("bash")[0].replace("\\\n", " ").replace(HUB_NAME, str(pipeline_dir)))
    assert command[0] == "t5hooks"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "t5hooks.apps.cli", *command[1:]], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    exec(compile(second, "README.md diffusion snippet 2", "exec"), scope)

    def pixels(name: str) -> np.ndarray:
        return np.asarray(scope[name], dtype=np.int16)

    assert pixels("image").shape == (16, 16, 3)
    assert np.abs(pixels("steered") - pixels("image")).max() > 0  # (another prompt, and steered)
    assert np.abs(pixels("same") - pixels("image")).max() <= 1  # the error term: the image unchanged
    assert np.abs(pixels("ablated") - pixels("image")).max() > 0
    assert np.abs(pixels("ablated_onnx") - pixels("image")).max() > 0  # fp32 ONNX vs bf16 eager: the edit shows
    assert np.abs(pixels("ablated_onnx") - pixels("ablated")).mean() < 8
    assert sorted(scope["per_layer"]) == [0, 1, 2]
