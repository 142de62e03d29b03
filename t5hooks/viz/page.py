"""Self-contained HTML pages: the page's numbers as JSON in `<script type="application/json" id="t5hooks-data">`,
rendered in the browser by one shipped script (assets/t5hooks-viz.js) and stylesheet. No CDN, no network:
single-file views inline both; a dashboard site ships them once in its `assets/` folder.

Numbers are written as the shortest decimal that reads back to the same float32 (`0.1`, not
`0.10000000149011612`), so what the page shows and what a tool reads from the JSON is the value computed.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path

ASSETS = Path(__file__).resolve().parent / "assets"
SCRIPT, STYLE = "t5hooks-viz.js", "t5hooks-viz.css"
DATA_ID = "t5hooks-data"


def asset_text(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


def floats(values: Any) -> Any:
    """A tensor / array / number as (nested) lists of Python floats, each the shortest decimal that reads back
    to the same float32; NaN and infinities become None (JSON has no such numbers)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim == 0:
        return _f32(arr)
    flat = [_f32(v) for v in arr.reshape(-1)]
    return _nest(flat, arr.shape)


def _f32(v: np.float32) -> float | None:
    if not math.isfinite(v):
        return None
    if v == 0:
        return 0.0
    return float(str(np.float32(v)))  # numpy prints the shortest float32 round-trip digits


def _nest(flat: list, shape: tuple[int, ...]) -> list:
    if len(shape) == 1:
        return flat
    step = math.prod(shape[1:])
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def to_json(data: Any) -> str:
    """JSON safe inside a <script> element: `<`, `>`, `&` only occur in strings, where \\u escapes are valid."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(data: dict[str, Any], title: str, *, asset_prefix: str | None = None) -> str:
    """A full HTML document for `data` (its "kind" picks the renderer). `asset_prefix=None` inlines the script
    and stylesheet (one self-contained file); otherwise they are linked from `asset_prefix` + file name."""
    if asset_prefix is None:
        style = f"<style>\n{asset_text(STYLE)}</style>"
        script = f"<script>\n{asset_text(SCRIPT)}</script>"
    else:
        style = f'<link rel="stylesheet" href="{html.escape(asset_prefix + STYLE)}">'
        script = f'<script src="{html.escape(asset_prefix + SCRIPT)}"></script>'
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n{style}\n</head>\n<body>\n"
        '<div id="t5hooks-root"></div>\n'
        f'<script type="application/json" id="{DATA_ID}">{to_json(data)}</script>\n'
        f"{script}\n</body>\n</html>\n"
    )


def write_text(path: str | Path, text: str, *, clean_stale: bool = True) -> Path:
    """Write a page atomically (a temporary file renamed into place)."""
    path = Path(path)
    with atomic_path(path, clean_stale=clean_stale) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


class View:
    """A view: `data` (what the page embeds), `html()` (a self-contained page), `save(path)`, and
    `_repr_html_()` so a notebook shows it (in an iframe, so several views on one notebook page stay apart)."""

    kind = ""
    height = 640  # notebook iframe height, px

    def __init__(self, data: dict[str, Any], title: str) -> None:
        self.data = {"kind": self.kind, **data}
        self.title = title

    def html(self) -> str:
        return render_page(self.data, self.title)

    def save(self, path: str | Path) -> Path:
        """Write the self-contained page (atomically); returns the path."""
        return write_text(path, self.html())

    def _repr_html_(self) -> str:
        return (
            f'<iframe srcdoc="{html.escape(self.html(), quote=True)}" style="width:100%;height:{self.height}px;'
            'border:1px solid #ddd" sandbox="allow-scripts"></iframe>'
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.title!r})"
