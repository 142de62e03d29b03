"""Heatmaps of head attributions and patching sweeps, as matplotlib Figures (PNG on request).

matplotlib is imported only when a plot is made, and figures are drawn on their own Agg canvas
without pyplot, so nothing here changes the global backend: in a notebook the returned Figure
displays inline, in a script or test it renders headless.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def heatmap(
    values: Tensor,  # [rows, cols]
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    *,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    colorbar_label: str | None = None,
    cmap: str = "RdBu_r",
    center: float | None = 0.0,
    annotate: bool | None = None,
    max_ticks: int = 40,
    figsize: tuple[float, float] | None = None,
    path: str | Path | None = None,
    dpi: int = 120,
) -> Figure:
    """A labelled heatmap of a 2-D tensor; saved as PNG to `path` when given. Returns the Figure.

    With `center` (default 0) the colour scale is symmetric around it (a diverging map: red helps, blue
    hurts); `center=None` spans min..max. `annotate` writes each value in its cell (default: small grids only).
    Axes with more than `max_ticks` labels show every k-th label.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"plots need matplotlib ({err}); install it with: pip install 't5hooks[plot]'"
        ) from err

    data = torch.as_tensor(values).detach().float().cpu()
    if data.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D tensor [rows, cols], got shape {tuple(data.shape)}")
    rows, cols = data.shape
    row_labels = [str(r) for r in range(rows)] if row_labels is None else [str(r) for r in row_labels]
    col_labels = [str(c) for c in range(cols)] if col_labels is None else [str(c) for c in col_labels]
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(f"{len(row_labels)} row / {len(col_labels)} column labels for a {rows} x {cols} grid")

    finite = data[torch.isfinite(data)]
    if center is None:
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    else:
        span = float((finite - center).abs().max()) if finite.numel() else 0.0
        span = span or 1.0
        vmin, vmax = center - span, center + span

    if figsize is None:
        figsize = (min(3.0 + 0.45 * cols, 18.0), min(2.0 + 0.32 * rows, 16.0))
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(data.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    _ticks(ax.set_xticks, col_labels, max_ticks, rotation=90 if max(map(len, col_labels), default=0) > 3 else 0)
    _ticks(ax.set_yticks, row_labels, max_ticks)
    if title:
        ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    fig.colorbar(image, ax=ax, label=colorbar_label)

    if annotate is None:
        annotate = rows * cols <= 150
    if annotate:
        for r in range(rows):
            for c in range(cols):
                value = float(data[r, c])
                if math.isfinite(value):
                    dark = abs(value - (center if center is not None else (vmin + vmax) / 2)) > 0.6 * (vmax - vmin) / 2
                    ax.text(
                        c, r, f"{value:.2g}", ha="center", va="center", fontsize=7, color="white" if dark else "black"
                    )
    if path is not None:
        save_figure(fig, path, dpi=dpi)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """`fig.savefig` through the atomic write (format from the suffix, which the temporary name keeps)."""
    from ..atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path


def _ticks(set_ticks, labels: list[str], max_ticks: int, rotation: int = 0) -> None:
    step = max(1, math.ceil(len(labels) / max_ticks))
    positions = list(range(0, len(labels), step))
    set_ticks(positions, [labels[p] for p in positions], rotation=rotation, fontsize=8)
