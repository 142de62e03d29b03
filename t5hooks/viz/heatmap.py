"""Interactive heatmaps of labelled grids: patching sweeps (`PatchingResult.html()`) and head attributions
(`LabelledGrid.html()`). Hovering a cell shows its row (layer, head), column (head, position) and value;
patching maps switch between the metric and the normalised effect."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .page import View, floats


class HeatmapView(View):
    """A labelled grid as an interactive page (`.html()`, `.save(path)`, `_repr_html_`). `data["values"]`
    `[rows][cols]` (None where not finite), `row_labels`, `col_labels`, `row_axis`, `col_axis`; patching maps
    also `clean_metric`, `corrupted_metric`, `method` and `normalized`."""

    kind = "heatmap"


def heatmap_view(
    values: Tensor,  # [rows, cols]
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str = "",
    axes: tuple[str, str] = ("row", "column"),
    value_label: str = "value",
    center: float = 0.0,
    clean_metric: float | None = None,
    corrupted_metric: float | None = None,
    method: str | None = None,
) -> HeatmapView:
    """A `HeatmapView`; with `clean_metric` and `corrupted_metric` (a patching sweep) the colours centre on the
    corrupted metric and the page also offers `(value - corrupted) / (clean - corrupted)`."""
    values = torch.as_tensor(values).detach().float().cpu()
    if values.ndim != 2 or tuple(values.shape) != (len(row_labels), len(col_labels)):
        raise ValueError(
            f"values of shape {tuple(values.shape)} do not match {len(row_labels)} row x {len(col_labels)} column labels"
        )
    data = {
        "title": title,
        "row_labels": [str(r) for r in row_labels],
        "col_labels": [str(c) for c in col_labels],
        "row_axis": axes[0],
        "col_axis": axes[1],
        "value_label": value_label,
        "center": floats(center),
        "values": floats(values),
        "normalized": None,
    }
    if clean_metric is not None and corrupted_metric is not None:
        data.update(clean_metric=floats(clean_metric), corrupted_metric=floats(corrupted_metric), method=method or "")
        gap = clean_metric - corrupted_metric
        if gap != 0 and math.isfinite(gap):
            data["normalized"] = floats((values - corrupted_metric) / gap)
    return HeatmapView(data, title or "heatmap")
