"""Self-contained HTML views: feature dashboards, attention views, patching maps (see page.py for the format).

    feature_dashboard(store, sae, out_dir)           a static site: index + a page per SAE feature
    model.attention_view(input, decoder_input)       attention patterns (also `cache.attention_view(...)`)
    patching_result.html() / LabelledGrid.html()     interactive heatmaps

Each page embeds its numbers as JSON in `<script type="application/json" id="t5hooks-data">`; views render in a
notebook (`_repr_html_`) and save to a file (`.save(path)`) that opens with no network.
"""

from .attention import AttentionView, attention_view
from .dashboard import feature_dashboard
from .heatmap import HeatmapView, heatmap_view

__all__ = ["AttentionView", "HeatmapView", "attention_view", "feature_dashboard", "heatmap_view"]
