"""Self-contained HTML pages: the page's numbers as JSON in `<script type="application/json" id="t5hooks-data">`,
rendered in the browser by one shipped script (assets/t5hooks-viz.js) and stylesheet. No CDN, no network:
single-file views inline both; a dashboard site ships them once in its `assets/` folder.

Numbers are written as the shortest decimal that reads back to the same float32 (`0.1`, not
`0.10000000149011612`), so what the page shows and what a tool reads from the JSON is the value computed.
"""

from __future__ import annotations

import html
import json
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
    """A tensor / array / number as (nested) lists of Python floats, each the shortest decimal (of at most 9
    significant digits) that reads back to the same float32; NaN and infinities become None (JSON has none)."""
    arr = _float32_array(values)
    short = short_decimals(arr)
    if not np.isfinite(arr).all():
        obj = short.astype(object)
        obj[~np.isfinite(arr)] = None
        return obj.tolist()
    return short.tolist()


def _float32_array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float32).numpy()
    return np.asarray(values, dtype=np.float32)


def short_decimals(values: Any) -> np.ndarray:
    """float64 array: each float32 value replaced by the double nearest to the shortest decimal with 6 to 9
    significant digits that reads back to the same float32 (so `repr` / JSON print it short and exact)."""
    arr = _float32_array(values)
    out = arr.astype(np.float64)
    flat, flat_arr = out.reshape(-1), arr.reshape(-1)
    sel = np.nonzero(np.isfinite(flat_arr) & (flat_arr != 0))[0]
    x = flat[sel]
    with np.errstate(all="ignore"):
        exp = np.floor(np.log10(np.abs(x)))
        for digits in (6, 7, 8, 9):
            if not len(sel):
                break
            k = digits - 1 - exp  # decimal places to keep; powers of ten up to 1e22 are exact doubles
            small = np.abs(k) <= 22
            up, down = small & (k >= 0), small & (k < 0)
            r = np.full_like(x, np.nan)
            r[up] = np.round(x[up] * 10.0 ** k[up]) / 10.0 ** k[up]
            r[down] = np.round(x[down] / 10.0 ** -k[down]) * 10.0 ** -k[down]
            ok = r.astype(np.float32) == x.astype(np.float32)
            flat[sel[ok]] = r[ok]
            sel, x, exp = sel[~ok], x[~ok], exp[~ok]
    return out  # anything left keeps its exact float32 value as a double


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
