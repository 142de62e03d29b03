"""A real headless Chromium for the page tests (Debian's `chromium` + `chromium-driver`, driven by selenium).

`make test` installs both (the `browser` target); without them a test module skips locally, and fails under
T5HOOKS_REQUIRE_REFERENCES=1 (CI), so the page tests never silently skip there. Chromium runs as root in CI and
with the network closed: no sandbox, no GPU, no background or component traffic, a fresh profile per session.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("T5HOOKS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("T5HOOKS_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1200,900",
]


def _unavailable() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (make browser: apt-get install chromium chromium-driver)"
    return None


def chromium_session() -> Iterator[Any]:
    """A selenium Chrome driver on the system Chromium (for a module-scoped fixture)."""
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("T5HOOKS_REQUIRE_REFERENCES") == "1":
            pytest.fail(f"the browser tests cannot run: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's driver manager must not try the network
    profile = tempfile.mkdtemp(prefix="t5hooks-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def load(driver: Any, path: Path) -> dict[str, Any]:
    """Open a page from disk; fail on any console message of level SEVERE or WARNING (errors, uncaught
    exceptions, failed loads); returns the page's embedded JSON as the browser sees it."""
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(Path(path).resolve().as_uri())
    rendered = driver.execute_script("return document.body.getAttribute('data-rendered')")
    problems = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
    assert not problems, f"console errors on {path}: {problems}"
    assert rendered, f"{path} did not finish rendering"
    return json.loads(driver.execute_script("return document.getElementById('t5hooks-data').textContent"))


def console_problems(driver: Any) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]


def assert_not_blank(driver: Any, path: Path | None = None) -> None:
    """The screenshot shows something: many colours, and a good share of non-white pixels."""
    from PIL import Image

    png = driver.get_screenshot_as_png()
    if path is not None:
        Path(path).write_bytes(png)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 30, "the screenshot has almost no colours"
    white = sum(n for n, rgb in colours if min(rgb) > 245)
    assert white < 0.99 * image.width * image.height, "the screenshot is (almost) blank"


def hover_text(driver: Any, element: Any) -> str:
    """Move the mouse onto `element` and return the tooltip the page shows."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).move_to_element(element).perform()
    tip = driver.find_element("id", "t5hooks-tooltip")
    assert tip.is_displayed(), "no tooltip on hover"
    return tip.text
