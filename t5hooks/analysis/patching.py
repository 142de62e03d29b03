"""Activation patching and attribution patching from a clean run into a corrupted run.

Targets (one function each, same arguments):
  `patch_residual`          a residual-stream point (`resid_pre` by default) per layer x position, either stack
  `patch_heads`             attention heads' `hook_z` (self- or cross-attention) per layer x head,
                            or per head x position
  `patch_cross_attn_edges`  cross-attention edges: decoder position q x encoder position k, per layer

A cross-attention *edge* (q, k) of layer l is what encoder position k sends to decoder position q: its
share `pattern[h, q, k] * v[k, h]` of each head's `z[q, h]` (summed over k it is `z[q, h]`). Patching the
edge swaps the corrupted run's share for the clean run's, weight *and* value together, so the rest of
the row is untouched and patching every edge of a layer patches its cross-attention output. (Patching a
single `hook_pattern` entry instead would mix a clean weight with a corrupted value and leave the row
no longer summing to one.)

`method="activation"` runs the patched forwards. Every sweep builds ONE `model.capture(patch=...)` module
with the patched hook points in "add" mode; rows of the corrupted batch are repeated `batch_rows` times
and each repeat gets its own patch (clean minus corrupted at its target, zero elsewhere), so a sweep is
a few batched forwards with fixed shapes: with `compile=True` the module is compiled once.
`method="attribution"` is attribution patching: the metric's gradient at the corrupted run times
(clean - corrupted) at each target, from one forward on the clean run and one forward+backward on the
corrupted run (`gradient="mean"` also takes the clean run's gradient and averages the two: the
trapezoid rule, exact when the metric is quadratic in the patched activation).

Both return a `PatchingResult` whose values are the metric of the patched run (attribution: its
first-order estimate `corrupted_metric + grad . delta`), so the two are directly comparable.

Arguments shared by every sweep:
  clean, corrupted  a `RunInputs`, or encoder tokens / text, or an `(input, decoder_input)` tuple, or a dict
                    of `model(...)` keywords; both must tokenize to the same encoder and decoder lengths
  metric            `metric(logits [batch, dec_pos, d_vocab]) -> scalar`, e.g. a mean logit difference
                    (attribution needs it differentiable: return a tensor)
  method            "activation" | "attribution";  gradient: "corrupted" | "mean" (attribution only)
  batch_rows        targets per batched forward (activation patching); memory grows with it
  compile           False, True (torch.compile with inductor) or a torch.compile backend name
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from torch import Tensor

from .cache import ATTN_KINDS, STACKS, act_name, check_choice
from .lens import LabelledGrid, token_labels

Metric = Callable[[Tensor], Union[Tensor, float]]  # logits [batch, dec_pos, d_vocab] -> scalar
Method = Literal["activation", "attribution"]
Gradient = Literal["corrupted", "mean"]
RESIDUAL_SITES = (
    "resid_pre",
    "resid_mid",
    "resid_mid_cross",
    "resid_post",
    "attn_out",
    "cross_attn_out",
    "mlp_out",
    "mlp_in",
)


@dataclass
class RunInputs:
    """One run's inputs, as `model(...)` takes them."""

    input: Any  # [batch, enc_pos] tokens, or text
    decoder_input: Any = None  # [batch, dec_pos] tokens, or text
    one_zero_attention_mask: Tensor | None = None  # [batch, enc_pos]
    decoder_attention_mask: Tensor | None = None  # [batch, dec_pos]


RunLike = Union[RunInputs, Tensor, str, Sequence, Mapping]


@dataclass
class PatchingResult(LabelledGrid):
    """Metric of the corrupted run with each target patched from the clean run (`values` `[rows, cols]`)."""

    clean_metric: float = float("nan")
    corrupted_metric: float = float("nan")
    method: str = "activation"

    def normalized(self) -> Tensor:
        """(patched - corrupted) / (clean - corrupted): 1 = the target restores the clean metric, 0 = no effect."""
        gap = self.clean_metric - self.corrupted_metric
        if gap == 0:
            raise ValueError("clean and corrupted metrics are equal: the normalised effect is undefined")
        return (self.values - self.corrupted_metric) / gap

    def plot(self, path: str | None = None, normalize: bool = False, **kwargs: Any):
        """Heatmap of the values (or of `normalized()`), centred on the corrupted metric (or on 0)."""
        from .plotting import heatmap

        kwargs.setdefault("title", self.title)
        if normalize:
            kwargs.setdefault("colorbar_label", "(patched - corrupted) / (clean - corrupted)")
            return heatmap(self.normalized(), self.row_labels, self.col_labels, path=path, **kwargs)
        kwargs.setdefault("center", self.corrupted_metric)
        kwargs.setdefault(
            "colorbar_label", f"metric (clean {self.clean_metric:.3g}, corrupted {self.corrupted_metric:.3g})"
        )
        return heatmap(self.values, self.row_labels, self.col_labels, path=path, **kwargs)

    def view(self) -> Any:
        """An interactive heatmap (`t5hooks.viz.HeatmapView`): hover shows the row (layer, head), the column (head,
        position) and the value; the page switches between the metric and the normalised effect."""
        from ..viz.heatmap import heatmap_view

        return heatmap_view(
            self.values,
            self.row_labels,
            self.col_labels,
            title=self.title,
            axes=self.axes,
            value_label="patched metric",
            center=self.corrupted_metric,
            clean_metric=self.clean_metric,
            corrupted_metric=self.corrupted_metric,
            method=self.method,
        )


# ---- public sweeps -----------------------------------------------------------------------------
def patch_residual(
    model: Any,
    clean: RunLike,
    corrupted: RunLike,
    metric: Metric,
    *,
    stack: str = "decoder",
    site: str = "resid_pre",
    layers: Sequence[int] | None = None,
    per_position: bool = True,
    method: Method = "activation",
    gradient: Gradient = "corrupted",
    batch_rows: int = 16,
    compile: bool | str = False,
) -> PatchingResult:
    """Patch the residual-stream point `site` of `stack` (e.g. "resid_pre", "resid_post", "attn_out",
    "mlp_out"; decoder also "cross_attn_out", "resid_mid_cross") per layer (rows) x position (columns), or
    at all positions at once with `per_position=False` (one column, "all")."""
    check_choice("stack", stack, STACKS)
    check_choice("site", site, RESIDUAL_SITES)
    layers = _layers(model, stack, layers)
    names = [act_name(site, l, stack) for l in layers]
    refs = _References(model, clean, corrupted, metric, names, method, gradient)
    targets: list[_Target] = []
    for name in names:
        diff = refs.diff(name)  # [batch, pos, d_model]
        if per_position:
            targets.extend(_Target(name, _masked(diff, {1: p})) for p in range(diff.shape[1]))
        else:
            targets.append(_Target(name, lambda diff=diff: diff))
    tokens = refs.position_tokens("encoder" if stack == "encoder" else "decoder")
    cols = tokens if per_position else ["all"]
    return _run(
        model,
        refs,
        targets,
        metric,
        [f"L{l}" for l in layers],
        cols,
        f"{stack} {site} patching",
        method,
        batch_rows,
        compile,
        axes=("layer", f"{stack} position" if per_position else "positions"),
    )


def patch_heads(
    model: Any,
    clean: RunLike,
    corrupted: RunLike,
    metric: Metric,
    *,
    stack: str = "decoder",
    attn: str = "self",
    layers: Sequence[int] | None = None,
    per_position: bool = False,
    method: Method = "activation",
    gradient: Gradient = "corrupted",
    batch_rows: int = 16,
    compile: bool | str = False,
) -> PatchingResult:
    """Patch each attention head's output `hook_z` (`attn`: "self", or "cross" in the decoder): layer (rows)
    x head (columns) at all positions, or with `per_position` head "L{l}H{h}" (rows) x query position."""
    check_choice("stack", stack, STACKS)
    check_choice("attn", attn, ATTN_KINDS)
    if attn == "cross" and stack != "decoder":
        raise ValueError("cross-attention heads exist only in the decoder: stack='decoder'")
    layers = _layers(model, stack, layers)
    names = [act_name("z", l, stack, attn) for l in layers]
    refs = _References(model, clean, corrupted, metric, names, method, gradient)
    H = model.cfg.n_heads
    targets: list[_Target] = []
    for name in names:
        diff = refs.diff(name)  # [batch, pos, H, d_head]
        for h in range(H):
            if per_position:
                targets.extend(_Target(name, _masked(diff, {1: p, 2: h})) for p in range(diff.shape[1]))
            else:
                targets.append(_Target(name, _masked(diff, {2: h})))
    kind = "cross-attention" if attn == "cross" else "self-attention"
    title = f"{stack} {kind} head (hook_z) patching"
    if per_position:
        rows = [f"L{l}H{h}" for l in layers for h in range(H)]
        return _run(
            model, refs, targets, metric, rows, refs.position_tokens(stack), title, method, batch_rows, compile,
            axes=("layer and head", f"{stack} position"),
        )  # fmt: skip
    return _run(
        model,
        refs,
        targets,
        metric,
        [f"L{l}" for l in layers],
        [f"H{h}" for h in range(H)],
        title,
        method,
        batch_rows,
        compile,
        axes=("layer", "head"),
    )


def patch_cross_attn_edges(
    model: Any,
    clean: RunLike,
    corrupted: RunLike,
    metric: Metric,
    *,
    layers: Sequence[int] | None = None,
    head: int | None = None,
    method: Method = "activation",
    gradient: Gradient = "corrupted",
    batch_rows: int = 16,
    compile: bool | str = False,
) -> PatchingResult:
    """Patch each cross-attention edge (decoder position q <- encoder position k; see module doc) of each
    decoder layer, through all heads or only `head`. Rows "L{l} {q}" (layer-major, so
    `values.view(len(layers), dec_pos, enc_pos)`), columns encoder positions."""
    layers = _layers(model, "decoder", layers)
    if head is not None and not 0 <= head < model.cfg.n_heads:
        raise ValueError(f"head={head} is out of range: valid 0..{model.cfg.n_heads - 1} or None (all heads)")
    needed = [act_name(a, l, "decoder", "cross") for l in layers for a in ("v", "pattern")]
    z_names = [act_name("z", l, "decoder", "cross") for l in layers]
    refs = _References(model, clean, corrupted, metric, needed, method, gradient, grad_names=z_names)
    targets: list[_Target] = []
    rows: list[str] = []
    dec_labels = refs.position_tokens("decoder")
    for l, z_name in zip(layers, z_names):
        message = {}
        for run in ("clean", "corrupted"):
            pattern = refs.activations(run)[act_name("pattern", l, "decoder", "cross")]  # [batch, H, dec, enc]
            v = refs.activations(run)[act_name("v", l, "decoder", "cross")]  # [batch, enc, H, d_head]
            message[run] = (pattern, v)
        D, E = message["clean"][0].shape[-2:]
        for q in range(D):
            rows.append(f"L{l} {dec_labels[q]}")
            targets.extend(_Target(z_name, _edge_delta(message, q, k, head)) for k in range(E))
    title = "cross-attention edge patching" + ("" if head is None else f", head {head}")
    return _run(
        model, refs, targets, metric, rows, refs.position_tokens("encoder"), title, method, batch_rows, compile,
        axes=("layer and decoder position", "encoder position"),
    )  # fmt: skip


# ---- targets ------------------------------------------------------------------------------------
@dataclass
class _Target:
    name: str  # the hook point patched ("add" mode)
    delta: Callable[[], Tensor]  # [batch, *activation] what patching this target adds to the corrupted run


def _masked(diff: Tensor, where: dict[int, int]) -> Callable[[], Tensor]:
    """`diff` kept only at index `where[dim]` of each listed dim, zero elsewhere (built when called)."""

    def build() -> Tensor:
        out = torch.zeros_like(diff)
        index = [slice(None)] * diff.ndim
        for dim, i in where.items():
            index[dim] = slice(i, i + 1)
        out[tuple(index)] = diff[tuple(index)]
        return out

    return build


def _edge_delta(message: dict[str, tuple[Tensor, Tensor]], q: int, k: int, head: int | None) -> Callable[[], Tensor]:
    """Change of cross-attention `z` `[batch, dec, H, d_head]` when edge (q <- k) carries the clean message."""

    def build() -> Tensor:
        (p_clean, v_clean), (p_corrupt, v_corrupt) = message["clean"], message["corrupted"]
        sent_clean = p_clean[:, :, q, k, None].to(v_clean.dtype) * v_clean[:, k]  # [batch, H, d_head]
        sent_corrupt = p_corrupt[:, :, q, k, None].to(v_corrupt.dtype) * v_corrupt[:, k]
        B, H, d = sent_clean.shape
        out = sent_clean.new_zeros(B, p_clean.shape[2], H, d)
        heads = slice(None) if head is None else slice(head, head + 1)
        out[:, q, heads] = (sent_clean - sent_corrupt)[:, heads]
        return out

    return build


# ---- reference runs ------------------------------------------------------------------------------
class _References:
    """The clean and corrupted runs: metrics, the activations the targets need, and (for attribution) the
    metric's gradient with respect to the patched activations."""

    def __init__(
        self,
        model: Any,
        clean: RunLike,
        corrupted: RunLike,
        metric: Metric,
        names: list[str],
        method: str,
        gradient: str,
        grad_names: list[str] | None = None,
    ) -> None:
        check_choice("method", method, ("activation", "attribution"))
        check_choice("gradient", gradient, ("corrupted", "mean"))
        self.model = model
        self.clean_inputs = _prepare(model, clean)
        self.corrupted_inputs = _prepare(model, corrupted)
        for what in ("input", "decoder_input"):
            a, b = self.clean_inputs[what], self.corrupted_inputs[what]
            if a.shape != b.shape:
                raise ValueError(
                    f"clean and corrupted {what} shapes differ ({tuple(a.shape)} vs {tuple(b.shape)}); patching "
                    f"swaps activations position by position, so pad both to the same length"
                )
        grad_names = names if grad_names is None else grad_names
        want_grads = method == "attribution"
        self._acts: dict[str, dict[str, Tensor]] = {}
        self.grads: dict[str, Tensor] = {}
        self.metrics: dict[str, float] = {}
        # One module for both reference runs: capture what the targets need, and add a zero "patch" to each
        # patched activation so its gradient is the gradient of that patch (leaf tensors: no parameter grads).
        capture = model.capture(
            list(dict.fromkeys(names + grad_names)), patch=grad_names if want_grads else (), patch_mode="add"
        )
        zero = {n: torch.zeros(()) for n in capture.patch_names}
        with torch.no_grad():
            out = capture(**self.clean_inputs, patches=zero or None)
        self._acts["clean"] = out
        self.metrics["clean"] = float(metric(out["logits"]))
        if not want_grads:
            with torch.no_grad():
                out = capture(**self.corrupted_inputs)
            self._acts["corrupted"] = out
            self.metrics["corrupted"] = float(metric(out["logits"]))
            return
        shapes = {n: self._acts["clean"][n] for n in grad_names}
        self._acts["corrupted"], self.metrics["corrupted"], self.grads = _run_with_grads(
            capture, self.corrupted_inputs, metric, shapes
        )
        if gradient == "mean":
            _, _, clean_grads = _run_with_grads(capture, self.clean_inputs, metric, shapes)
            self.grads = {n: (self.grads[n] + clean_grads[n]) / 2 for n in grad_names}

    def activations(self, run: str) -> dict[str, Tensor]:
        return self._acts[run]

    def diff(self, name: str) -> Tensor:
        """clean - corrupted activation at `name` (what activation patching adds there)."""
        return self._acts["clean"][name] - self._acts["corrupted"][name]

    def position_tokens(self, side: str) -> list[str]:
        """Labels of the encoder or decoder positions (clean token, and the corrupted one where it differs)."""
        key = "input" if side == "encoder" else "decoder_input"
        return token_labels(self.model, self.clean_inputs[key][0], self.corrupted_inputs[key][0])


def _run_with_grads(capture: Any, inputs: dict[str, Tensor | None], metric: Metric, like: dict[str, Tensor]):
    zeros = {n: torch.zeros_like(t, requires_grad=True) for n, t in like.items()}
    with torch.enable_grad():
        out = capture(**inputs, patches=zeros)
        value = metric(out["logits"])
        if not isinstance(value, Tensor) or value.numel() != 1 or not value.requires_grad:
            raise ValueError(
                "attribution patching needs a metric that returns a differentiable scalar tensor "
                "of the logits (e.g. a logit difference, not a Python float)"
            )
        grads = torch.autograd.grad(value, list(zeros.values()))
    acts = {n: t.detach() for n, t in out.items()}
    return acts, float(value.detach()), dict(zip(zeros, grads))


def _prepare(model: Any, run: RunLike) -> dict[str, Tensor | None]:
    """The run's token and mask tensors, validated and defaulted as `model(...)` does, as keyword arguments
    of a capture module."""
    if isinstance(run, RunInputs):
        pass
    elif isinstance(run, Mapping):
        run = RunInputs(**run)
    elif isinstance(run, tuple):
        run = RunInputs(*run)
    else:
        run = RunInputs(run)
    tokens, mask, dec, dec_mask, _ = model.prepare_inputs(
        run.input, run.decoder_input, run.one_zero_attention_mask, run.decoder_attention_mask
    )
    return {"input": tokens, "decoder_input": dec, "one_zero_attention_mask": mask, "decoder_attention_mask": dec_mask}


# ---- evaluation ---------------------------------------------------------------------------------
def _run(
    model: Any,
    refs: _References,
    targets: list[_Target],
    metric: Metric,
    row_labels: list[str],
    col_labels: list[str],
    title: str,
    method: str,
    batch_rows: int,
    compile: bool | str,
    *,
    axes: tuple[str, str],
) -> PatchingResult:
    if method == "activation":
        values = _activation_sweep(model, refs, targets, metric, batch_rows, compile)
    else:
        values = torch.tensor(
            [refs.metrics["corrupted"] + float((refs.grads[t.name] * t.delta()).sum()) for t in targets]
        )
    return PatchingResult(
        values.view(len(row_labels), len(col_labels)),
        row_labels,
        col_labels,
        title=f"{title} ({method})",
        clean_metric=refs.metrics["clean"],
        corrupted_metric=refs.metrics["corrupted"],
        method=method,
        axes=axes,
    )


def _activation_sweep(
    model: Any, refs: _References, targets: list[_Target], metric: Metric, batch_rows: int, compile: bool | str
) -> Tensor:  # [targets]
    """Run every target's patch, `batch_rows` targets per forward, through one capture module."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    names = model.resolve_names(sorted({t.name for t in targets}))
    runner = model.capture((), patch=names, patch_mode="add")
    if compile:
        backend = compile if isinstance(compile, str) else "inductor"
        runner = torch.compile(runner, fullgraph=True, dynamic=False, backend=backend)
    rows = min(batch_rows, len(targets))
    inputs = {k: None if t is None else t.repeat(rows, 1) for k, t in refs.corrupted_inputs.items()}
    corrupted = refs.activations("corrupted")
    B = refs.corrupted_inputs["input"].shape[0]
    values = []
    for start in range(0, len(targets), rows):
        chunk = targets[start : start + rows]  # the last chunk is padded with unpatched rows: shapes stay fixed
        patches = {n: corrupted[n].new_zeros((rows * B, *corrupted[n].shape[1:])) for n in names}
        for i, target in enumerate(chunk):
            patches[target.name][i * B : (i + 1) * B] = target.delta()
        with torch.no_grad():
            logits = runner(**inputs, patches=patches)["logits"]
        logits = logits.view(rows, B, *logits.shape[1:])  # [rows, batch, dec_pos, d_vocab]
        values.extend(float(metric(logits[i])) for i in range(len(chunk)))
    return torch.tensor(values)


def _layers(model: Any, stack: str, layers: Sequence[int] | None) -> list[int]:
    n = model.cfg.n_layers if stack == "encoder" else model.cfg.n_decoder_layers
    if layers is None:
        return list(range(n))
    layers = [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < n]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} invalid for the {stack}: valid 0..{n - 1} (or None for all)")
    return layers
