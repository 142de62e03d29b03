"""Read-outs of a cached run: the decoder logit lens, per-head direct logit attribution, labelled grids.

Everything here reads the output path the model really uses (decoder final RMSNorm, T5 v1.0's
`d_model**-0.5` scaling, `W_U`) through `ActivationCache`, so the last logit-lens layer is the logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..tables import format_table
from .cache import ActivationCache, SliceInput

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class LabelledGrid:
    """A 2-D result with a label per row and per column (a heatmap waiting to happen)."""

    values: Tensor  # [rows, cols]
    row_labels: list[str]
    col_labels: list[str]
    title: str = ""
    axes: tuple[str, str] = ("row", "column")  # what rows and columns index, e.g. ("layer", "head")

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or tuple(self.values.shape) != (len(self.row_labels), len(self.col_labels)):
            raise ValueError(
                f"values of shape {tuple(self.values.shape)} do not match {len(self.row_labels)} row labels x "
                f"{len(self.col_labels)} column labels"
            )

    def plot(self, path: str | None = None, **kwargs: Any) -> Figure:
        """Heatmap (see `plotting.heatmap` for options); saved as PNG when `path` is given."""
        from .plotting import heatmap

        kwargs.setdefault("title", self.title)
        return heatmap(self.values, self.row_labels, self.col_labels, path=path, **kwargs)

    def view(self) -> Any:
        """An interactive heatmap (`t5hooks.viz.HeatmapView`: hover shows row, column and value)."""
        from ..viz.heatmap import heatmap_view

        return heatmap_view(self.values, self.row_labels, self.col_labels, title=self.title, axes=self.axes)

    def html(self) -> str:
        """A self-contained HTML page of the interactive heatmap (`.view().save(path)` writes it to a file)."""
        return self.view().html()

    def _repr_html_(self) -> str:
        return self.view()._repr_html_()


def token_labels(model: Any, tokens: Tensor, other: Tensor | None = None) -> list[str]:
    """ "{pos}:{token}" per position of a 1-D token row ("{pos}" without a tokenizer); where `other` (a
    second row, e.g. the corrupted prompt) differs, "{pos}:{token}/{other token}"."""
    tokens = torch.as_tensor(tokens).flatten()
    if model.tokenizer is None:
        return [str(p) for p in range(len(tokens))]
    names = model.to_str_tokens(tokens.cpu())
    if other is None:
        return [f"{p}:{t}" for p, t in enumerate(names)]
    other_names = model.to_str_tokens(torch.as_tensor(other).flatten().cpu())
    return [f"{p}:{t}" if t == o else f"{p}:{t}/{o}" for p, (t, o) in enumerate(zip(names, other_names))]


# ---- logit lens ------------------------------------------------------------------------------
@dataclass
class LogitLens:
    """Each decoder residual point read out as logits through the model's true output path."""

    logits: Tensor  # [points, batch, pos, d_vocab] (pos / batch as sliced)
    labels: list[str]  # one per point: "0_pre" ... "final_post"
    top_values: Tensor  # [points, batch, pos, k] the largest logits
    top_ids: Tensor  # [points, batch, pos, k] their token ids

    def table(
        self,
        model: Any,
        batch_index: int = 0,
        positions: Sequence[int] | None = None,
        decoder_tokens: Tensor | None = None,
    ) -> str:
        """Text table of the top-k tokens per point (see `format_logit_lens`)."""
        return format_logit_lens(self, model, batch_index, positions, decoder_tokens)


def logit_lens(
    model: Any, cache: ActivationCache, k: int = 5, incl_mid: bool = False, pos_slice: SliceInput = None
) -> LogitLens:
    """Logit lens over the decoder: the residual stream at every block input ("{l}_pre", with `incl_mid` also
    after self- and cross-attention) and the final one, each normalised by its own RMS with the final norm,
    scaled as T5 scales logits, and multiplied by `W_U`. The "final_post" point reproduces the logits.

    Needs the decoder's `hook_resid_*` in `cache`. Memory: points x batch x pos x d_vocab floats; narrow
    with `pos_slice` (e.g. -1, or a list of positions) for large vocabularies.
    """
    _check_cache_model(model, cache)
    if isinstance(pos_slice, int) and not isinstance(pos_slice, bool):
        pos_slice = [pos_slice]  # keep the pos dimension so the result is always [points, batch, pos, vocab]
    with torch.no_grad():
        resid, labels = cache.accumulated_resid(
            incl_mid=incl_mid, apply_ln=True, pos_slice=pos_slice, return_labels=True, stack="decoder"
        )  # [points, batch, pos, d_model]
        if not cache.has_batch_dim:
            resid = resid.unsqueeze(1)
        logits = resid @ model.W_U.to(resid.dtype)  # [points, batch, pos, d_vocab]
        top_values, top_ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
    return LogitLens(logits, labels, top_values, top_ids)


def _check_cache_model(model: Any, cache: ActivationCache) -> None:
    if cache.model is not model:
        raise ValueError(
            "this cache was made by a different model (e.g. before fold_ln or with other weights); "
            "pass the model whose run_with_cache produced it"
        )


def format_logit_lens(
    lens: LogitLens,
    model: Any,
    batch_index: int = 0,
    positions: Sequence[int] | None = None,
    decoder_tokens: Tensor | None = None,
) -> str:
    """One table per decoder position: a row per residual point with its top-k next tokens and their
    probabilities under that point's read-out. Token strings come from the model's tokenizer (ids without one).
    `decoder_tokens` (`[batch, pos]`, the decoder input) labels each position with the token it reads.
    """
    if not 0 <= batch_index < lens.logits.shape[1]:
        raise ValueError(f"batch_index={batch_index} is out of range for a batch of {lens.logits.shape[1]}")
    n_pos = lens.logits.shape[2]
    positions = range(n_pos) if positions is None else positions
    probs = lens.logits[:, batch_index].float().softmax(-1)  # [points, pos, d_vocab]
    blocks = []
    for pos in positions:
        if not -n_pos <= pos < n_pos:
            raise ValueError(f"position {pos} is out of range for {n_pos} decoder positions")
        pos %= n_pos
        rows = []
        for point, label in enumerate(lens.labels):
            ids = lens.top_ids[point, batch_index, pos].tolist()
            names = _token_strings(model, ids)
            rows.append((label, "  ".join(f"{name!r} {probs[point, pos, i]:.2f}" for name, i in zip(names, ids))))
        heading = f"decoder position {pos}"
        if decoder_tokens is not None:
            read = _token_strings(model, [int(torch.as_tensor(decoder_tokens)[batch_index, pos])])[0]
            heading += f" (reads {read!r})"
        header = ("point", f"top-{lens.top_ids.shape[-1]} next tokens (probability)")
        blocks.append(heading + "\n" + format_table(rows, header))
    return "\n\n".join(blocks)


def _token_strings(model: Any, ids: list[int]) -> list[str]:
    if getattr(model, "tokenizer", None) is None:
        return [f"#{i}" for i in ids]
    return model.to_str_tokens(torch.tensor(ids))


# ---- direct logit attribution per head -----------------------------------------------------------
def head_logit_attribution(
    model: Any,
    cache: ActivationCache,
    tokens: str | int | Tensor,
    incorrect_tokens: str | int | Tensor | None = None,
    attn: str = "self",
    pos: int = -1,
) -> LabelledGrid:
    """Direct logit attribution of every decoder head (`attn`: "self" or "cross") at decoder position `pos`,
    averaged over the batch: a `[n_decoder_layers, n_heads]` grid. `tokens` / `incorrect_tokens` as in
    `ActivationCache.logit_attrs` (an id, or `[batch]`)."""
    _check_cache_model(model, cache)
    with torch.no_grad():
        heads = cache.stack_head_results(pos_slice=pos, stack="decoder", attn=attn)  # [L*H, batch, d_model]
        attrs = cache.logit_attrs(heads, tokens, incorrect_tokens, pos_slice=pos)  # [L*H, batch]
        if cache.has_batch_dim:
            attrs = attrs.mean(-1)
    L, H = model.cfg.n_decoder_layers, model.cfg.n_heads
    what = "logit difference" if incorrect_tokens is not None else "logit"
    kind = "cross-attention" if attn == "cross" else "self-attention"
    return LabelledGrid(
        attrs.reshape(L, H),
        [f"L{l}" for l in range(L)],
        [f"H{h}" for h in range(H)],
        title=f"Decoder {kind} heads: direct {what} attribution at position {pos}",
        axes=("layer", "head"),
    )
