"""Every ```python snippet in README.md runs when pasted alone into a fresh interpreter.

Each snippet runs in its own empty namespace (as if pasted alone: nothing an earlier snippet defined is
visible, so a snippet that uses a name it does not define fails with NameError), in a temporary working
directory, on the embedded model: every Hugging Face hub name ("org/name" strings, "t5-*", "google/*", ...)
passed to `from_pretrained` becomes "t5hooks-tiny". All snippets run in one child process (one torch import,
not nine), each in a fresh `__main__`-like namespace.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# from_pretrained("<anything with a slash, or a known hub family>") -> the embedded model
HUB_NAME = re.compile(r"""from_pretrained\(\s*(["'])(?:[\w.-]+/[\w.-]+|t5-[\w-]+|google/[\w.-]+)\1""")

RUN_ALONE = """
import json, sys, traceback, warnings
warnings.simplefilter("ignore")
results = []
for i, source in enumerate(json.load(sys.stdin)):
    namespace = {"__name__": "__main__"}  # what a fresh interpreter has
    try:
        exec(compile(source, f"README.md snippet {i + 1}", "exec"), namespace)
        results.append(None)
    except Exception as err:
        results.append(f"{type(err).__name__}: {err}\\n" + traceback.format_exc(limit=-3))
print("RESULTS " + json.dumps(results))
"""


def snippets() -> list[str]:
    return SNIPPET.findall(README.read_text())


def runnable(source: str) -> str:
    return HUB_NAME.sub('from_pretrained("t5hooks-tiny"', source)


def test_readme_has_snippets():
    assert len(snippets()) >= 3
    assert HUB_NAME.search('from_pretrained("google/flan-t5-small")')


@pytest.mark.slow  # compiles, exports ONNX and a generator: ~2 min on a loaded 2-core machine
def test_readme_snippets_run_each_alone(tmp_path):
    sources = [runnable(s) for s in snippets()]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", RUN_ALONE], input=json.dumps(sources), capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=900,
    )  # fmt: skip
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, out.stderr[-3000:]
    failures = [
        f"README snippet {i + 1} failed alone: {error}\n---\n{snippets()[i]}"
        for i, error in enumerate(json.loads(line.removeprefix("RESULTS ")))
        if error is not None
    ]
    assert not failures, "\n\n".join(failures)
