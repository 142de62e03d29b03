"""Feature dashboards: a static site (index + a page per feature) for an SAE over an activation store.

`feature_dashboard(store, sae, out_dir)` reads the store once, shard by shard, encodes it in chunks with the SAE
(on `device`: the GPU when there is one) and folds each chunk into `FeatureStats` (top-k, reservoir sample,
quantile sketch; memory independent of the store's size), then writes:

    index.html              every feature: density, max and mean activation, top tokens; sortable, searchable
    features/<f>.html       top activating contexts (tokens shaded by activation, value on hover), samples
                            from activation quantile bins, the activation histogram, the logit effect
                            (decoder-stream features), nearest features by decoder cosine
    assets/                 the page script and stylesheet (no network needed)
    t5hooks-dashboard.json  what was built from what (and the index's numbers)

Every page embeds its numbers as JSON (`<script type="application/json" id="t5hooks-data">`). The site is built
in a temporary folder beside `out_dir` and renamed into place, so `out_dir` is never half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..atomic import temp_path_for
from ..store.reader import ActivationStore
from .feature_stats import N_BUCKETS, Context, FeatureStats, bucket_edges
from .page import SCRIPT, STYLE, asset_text, render_page, short_decimals

SITE_MARKER = "t5hooks-dashboard.json"
HIST_BINS = 40


def feature_dashboard(
    store: ActivationStore | str | os.PathLike,
    sae: Any,
    out_dir: str | os.PathLike,
    *,
    hook: str | None = None,
    model: Any = None,
    tokenizer: Any = None,
    features: Sequence[int] | None = None,
    top_k: int = 20,
    reservoir: int = 60,
    quantile_bins: int = 10,
    per_bin: int = 5,
    context: tuple[int, int] = (10, 4),
    n_neighbours: int = 8,
    n_logits: int = 10,
    chunk_rows: int = 4096,
    device: torch.device | str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Build the dashboard of `sae` (a t5hooks SAE or a SAELens folder) over `store` (an `ActivationStore` or
    its folder) into `out_dir`; returns it.

    `hook`: the store's hook the SAE reads (default: the SAE's recorded `hook_name`). `model` gives token
    strings (its tokenizer) and, for decoder-stream hooks, the logit effect; `tokenizer` alone gives token
    strings (ids otherwise). `features`: pages for these features only (the pass still computes all).
    `top_k` top examples; `reservoir` uniformly sampled active tokens per feature, shown `per_bin` per
    quantile bin (`quantile_bins` equal-mass bins); `context` tokens (before, after) around each example.
    `chunk_rows` tokens per SAE encoding (memory: about `chunk_rows * d_sae * 4` bytes). `overwrite`
    replaces an existing dashboard at `out_dir`.
    """
    t0 = time.perf_counter()
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    sae = _load_sae(sae)
    hook = _resolve_hook(store, sae, hook)
    if not store.complete:
        raise ValueError(
            f"{store.path} is incomplete (an extraction is running or was stopped); re-run the same extract to "
            "finish it before building a dashboard"
        )
    d_in = int(torch.tensor(store.shape(hook)).prod())
    if sae.d_in != d_in:
        raise ValueError(f"the SAE reads d_in={sae.d_in} but {hook} holds {d_in} values per token {store.shape(hook)}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if quantile_bins < 1 or per_bin < 0:
        raise ValueError(f"quantile_bins must be >= 1 and per_bin >= 0, got {quantile_bins} and {per_bin}")
    if model is not None:
        _check_model_matches(store, model)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    device = torch.device(device) if device is not None else _default_device(sae)
    chosen = _feature_list(features, sae.d_sae)

    stats, sources, seconds = _stream(store, hook, sae, device, chunk_rows, top_k, reservoir, context, seed, progress)
    site = _Site(store, hook, sae, stats, sources, tokenizer, model, quantile_bins, per_bin, n_neighbours, n_logits)
    tmp = temp_path_for(out_dir)
    try:
        site.write(tmp, chosen, {"pass_seconds": seconds, "seconds": time.perf_counter() - t0, "seed": seed})
        _swap_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ---- inputs ---------------------------------------------------------------------------------------
def _load_sae(sae: Any) -> Any:
    if isinstance(sae, (str, os.PathLike)):
        from ..interventions.saelens_format import load_saelens

        return load_saelens(sae)
    if not all(hasattr(sae, a) for a in ("encode", "W_dec", "d_sae", "d_in")):
        raise TypeError(f"sae must be a t5hooks SAE or a SAELens SAE folder, got {type(sae).__name__}")
    return sae


def _resolve_hook(store: ActivationStore, sae: Any, hook: str | None) -> str:
    recorded = getattr(sae, "hook_name", None)
    if hook is None:
        if recorded is None:
            raise ValueError(f"the SAE records no hook_name; pass hook= (one of {store.names})")
        hook = recorded
    elif recorded is not None and recorded != hook:
        raise ValueError(f"the SAE was trained on {recorded!r}, not {hook!r}")
    if hook not in store.names:
        raise ValueError(f"the store at {store.path} holds no {hook!r}; it holds {store.names}")
    return hook


def _check_model_matches(store: ActivationStore, model: Any) -> None:
    """The model must be the one that made the store (its weights' fingerprint): logit effects and token
    strings of another model would be wrong without any sign of it."""
    from ..store.format import model_fingerprint

    recorded = store.config.get("model", {}).get("weights_sample_sha256")
    if recorded is not None and model_fingerprint(model)["weights_sample_sha256"] != recorded:
        raise ValueError(
            f"the model passed is not the one that made the store at {store.path} (weight fingerprints differ); "
            f"pass the model the store was extracted with"
        )


def _default_device(sae: Any) -> torch.device:
    dev = sae.W_enc.device
    if dev.type == "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return dev


def _feature_list(features: Sequence[int] | None, d_sae: int) -> list[int]:
    if features is None:
        return list(range(d_sae))
    chosen = sorted({int(f) for f in features})
    bad = [f for f in chosen if not 0 <= f < d_sae]
    if bad or not chosen:
        raise ValueError(f"features {bad or list(features)} invalid: valid 0..{d_sae - 1}")
    return chosen


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise NotADirectoryError(f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()):
            if not (out_dir / SITE_MARKER).exists():
                raise FileExistsError(f"{out_dir} is not empty and holds no dashboard; choose an empty or new folder")
            if not overwrite:
                raise FileExistsError(f"{out_dir} holds a dashboard; pass overwrite=True (--force) to replace it")


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = temp_path_for(out_dir.with_name(out_dir.name + "-old"))
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- the pass ---------------------------------------------------------------------------------------
def _stream(store, hook, sae, device, chunk_rows, top_k, reservoir, context, seed, progress):
    """One pass over the store's shards -> (FeatureStats, {doc: encoder token ids} for decoder streams, seconds)."""
    from tqdm.auto import tqdm

    before, after = context
    stats = FeatureStats(
        sae.d_sae, top_k=top_k, reservoir=reservoir, before=before, after=after, seed=seed, device=device
    )
    sources: dict[int, Tensor] | None = {} if store.axis(hook) == "decoder" else None
    t0 = time.perf_counter()
    was_training = sae.training
    sae_device = sae.W_enc.device
    sae.eval().to(device)
    bar = tqdm(total=store.num_rows(hook), unit="tok", desc="dashboard", disable=not progress, dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for shard in store.iter_shards(hook, source_tokens=sources is not None):
                acts = shard["acts"].reshape(len(shard["doc"]), -1)
                ctx_doc, ctx_pos, ctx_tok = shard["doc"], shard["pos"], shard["token_id"]
                N = len(acts)
                for start in range(0, N, chunk_rows):
                    n = min(chunk_rows, N - start)
                    lo, hi = max(0, start - before), min(N, start + n + after)
                    x = acts[lo:hi].to(device=device, dtype=sae.W_enc.dtype, non_blocking=True)
                    feats = sae.encode(x)  # [hi - lo, d_sae]
                    stats.update(feats, n, Context(ctx_doc, ctx_pos, ctx_tok, start, lo))
                    bar.update(n)
                if sources is not None:
                    stats.compact()
                    _keep_sources(sources, shard.get("source"), stats)
        stats.compact()
    finally:
        bar.close()
        sae.train(was_training).to(sae_device)
    return stats, sources, time.perf_counter() - t0


def _keep_sources(sources: dict[int, Tensor], source: dict[str, Tensor] | None, stats: FeatureStats) -> None:
    """Keep the encoder tokens of the documents that kept examples come from (and only those)."""
    if source is None:
        return
    needed = torch.cat([stats.top.doc[stats.top.filled], stats.sample.doc[stats.sample.filled]]).unique().cpu()
    doc = source["doc"]
    if len(doc):
        here = needed[(needed >= doc[0]) & (needed <= doc[-1])].tolist()
        starts = torch.searchsorted(doc, torch.tensor(here, dtype=doc.dtype))
        ends = torch.searchsorted(doc, torch.tensor(here, dtype=doc.dtype), right=True)
        for d, s, e in zip(here, starts.tolist(), ends.tolist()):
            if e > s and d not in sources:
                sources[d] = source["token_id"][s:e].clone()
    keep = set(needed.tolist())
    for d in [d for d in sources if d not in keep]:
        del sources[d]


# ---- the site ----------------------------------------------------------------------------------------
class _Site:
    """The pages, from the pass's statistics (moved to the host as numpy arrays once)."""

    def __init__(
        self, store, hook, sae, stats, sources, tokenizer, model, quantile_bins, per_bin, n_neighbours, n_logits
    ):
        self.store, self.hook, self.sae, self.stats = store, hook, sae, stats
        self.stream = store.axis(hook)
        self.sources = sources
        self.tokenizer, self.model = tokenizer, model
        self.per_bin, self.n_neighbours, self.n_logits = per_bin, n_neighbours, n_logits
        self.sae_label = getattr(sae, "architecture", type(sae).__name__) + f", d_sae {sae.d_sae}"
        self.n_tokens = stats.n_tokens
        counts = stats.counts.cpu()
        self.counts = counts.numpy()
        self.max = short_decimals(stats.max)
        self.min = short_decimals(torch.where(counts > 0, stats.min.cpu(), 0.0))
        self.mean = short_decimals((stats.sum.cpu() / counts.clamp_min(1)).float())
        self.density = (counts.double() / max(self.n_tokens, 1)).numpy()
        self.sketch = stats.sketch.view(sae.d_sae, N_BUCKETS).cpu()
        self.edges = bucket_edges()
        self.short_edges = short_decimals(self.edges)
        self.qs = torch.linspace(0, 1, quantile_bins + 1)
        self.quantile_edges = short_decimals(self._quantiles(self.qs))  # [F, bins + 1]
        self.slots = {"top": _host(stats.top), "sample": _host(stats.sample)}
        self._strings: dict[int, str] = {}
        self._row_cache: tuple[Any, Any] = (None, None)

    # -- numbers --
    def _quantiles(self, qs: Tensor) -> Tensor:  # [F, len(qs)] activation at each quantile of the active tokens
        counts = self.sketch.double()
        n = counts.sum(1, keepdim=True)
        cum = counts.cumsum(1)
        target = qs.double()[None] * n  # [F, Q]
        idx = torch.searchsorted(cum, target).clamp_(max=N_BUCKETS - 1)
        before = torch.where(idx > 0, cum.gather(1, (idx - 1).clamp(min=0)), torch.zeros_like(target))
        frac = ((target - before) / counts.gather(1, idx).clamp_min(1)).clamp(0, 1)
        lo, hi = self.edges.double()[idx], self.edges.double()[idx + 1]
        values = lo + frac * (hi - lo)
        low = torch.as_tensor(self.min)[:, None].expand_as(values)
        high = torch.as_tensor(self.max)[:, None].expand_as(values)
        values = torch.minimum(torch.maximum(values, low), high)
        values[:, qs <= 0] = low[:, :1]
        values[:, qs >= 1] = high[:, :1]
        return values.float()

    def histogram(self, f: int) -> dict[str, Any]:
        """Exact counts of active tokens over <= HIST_BINS runs of sketch buckets between min and max."""
        if self.counts[f] == 0:
            return {"edges": [], "counts": []}
        row = self.sketch[f].numpy()
        nonzero = np.nonzero(row)[0]
        b0, b1 = int(nonzero[0]), int(nonzero[-1]) + 1
        group = -(-(b1 - b0) // HIST_BINS)
        starts = np.arange(b0, b1, group)
        counts = np.add.reduceat(row[b0:b1], starts - b0)
        edges = self.short_edges[np.append(starts, min(starts[-1] + group, b1))]
        edges[0], edges[-1] = self.min[f], self.max[f]
        return {"edges": edges.tolist(), "counts": counts.tolist()}

    # -- strings --
    def strings(self, ids: Any) -> None:
        """Look up (once) the strings of token ids."""
        missing = sorted({int(i) for i in ids if i >= 0 and int(i) not in self._strings})
        if not missing:
            return
        tok = self.tokenizer
        if tok is None:
            self._strings.update({i: f"#{i}" for i in missing})
            return
        label = getattr(tok, "str_tokens", None)
        names = label(missing) if callable(label) else [tok.decode([i]) for i in missing]
        self._strings.update(zip(missing, names))

    def _rows(self, which: str, f: int) -> tuple[list, ...]:
        """One feature's kept entries as Python lists (converted once per feature)."""
        key = (which, f)
        if self._row_cache[0] != key:
            h = self.slots[which]
            lists = tuple(h[k][f].tolist() for k in ("tokens", "acts", "pos", "doc", "value"))
            self._row_cache = (key, lists)
        return self._row_cache[1]

    def examples(self, which: str, f: int, js: list[int]) -> list[dict[str, Any]]:
        tokens, acts, positions, docs, values = self._rows(which, f)
        out = []
        for j in js:
            kept = [i for i, t in enumerate(tokens[j]) if t >= 0]
            pos, doc = positions[j], docs[j]
            ex = {
                "doc": doc,
                "pos": pos,
                "activation": values[j],
                "start": pos - (self.stats.before - kept[0]),
                "tokens": [self._strings[tokens[j][i]] for i in kept],
                "acts": [acts[j][i] for i in kept],
            }
            if self.sources is not None:
                src = self.sources.get(doc)
                ex["source"] = None if src is None else [self._strings[t] for t in src.tolist()]
            out.append(ex)
        return out

    def bins(self, f: int) -> list[dict[str, Any]]:
        if self.counts[f] == 0:
            return []
        h = self.slots["sample"]
        edges = self.quantile_edges[f]
        filled = np.nonzero(h["filled"][f])[0]
        which = np.searchsorted(edges[1:-1], h["value"][f, filled], side="right")  # bin of each sampled token
        return [
            {
                "q_lo": float(self.qs[b]),
                "q_hi": float(self.qs[b + 1]),
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "examples": self.examples("sample", f, filled[which == b][: self.per_bin].tolist()),
            }
            for b in range(len(edges) - 1)
        ]

    # -- pages --
    def write(self, root: Path, chosen: list[int], timing: dict[str, Any]) -> None:
        """The whole site into `root` (a fresh temporary folder, renamed into place by the caller: the files
        inside need no atomic writes of their own)."""
        root.mkdir(parents=True)
        (root / "assets").mkdir()
        (root / "features").mkdir()
        for name in (SCRIPT, STYLE):
            (root / "assets" / name).write_text(asset_text(name), encoding="utf-8")
        ids = [np.unique(h["tokens"]) for h in self.slots.values()]
        if self.sources:
            ids += [np.unique(torch.cat(list(self.sources.values())).numpy())]
        self.strings(np.unique(np.concatenate(ids)).tolist())
        logit_effect = _LogitEffect(self.model, self.hook, self.sae, self.n_logits, self.stream)
        if logit_effect.directions is not None:
            self.strings(logit_effect.token_ids(chosen))
        neighbours = _neighbours(self.sae.W_dec.detach(), chosen, self.n_neighbours)
        top = self.slots["top"]
        centre = self.stats.before
        index_rows = []
        for f in chosen:
            filled = np.nonzero(top["filled"][f])[0].tolist()
            top_examples = self.examples("top", f, filled)
            row = {
                "feature": f,
                "density": float(self.density[f]),
                "max_activation": float(self.max[f]),
                "mean_activation": float(self.mean[f]),
                "top_tokens": list(dict.fromkeys(self._strings[int(top["tokens"][f, j, centre])] for j in filled))[:5],
            }
            index_rows.append(row)
            data = {
                "kind": "feature",
                **row,
                "hook": self.hook,
                "stream": self.stream,
                "sae_label": self.sae_label,
                "n_tokens": self.n_tokens,
                "n_firing": int(self.counts[f]),
                "min_activation": float(self.min[f]),
                "top_examples": top_examples,
                "quantile_bins": self.bins(f),
                "histogram": self.histogram(f),
                "logit_effect": logit_effect.of(f, self._strings),
                "neighbours": neighbours[f],
                "index_href": "../index.html",
                "page_pattern": "{feature}.html",
            }
            page = render_page(data, f"Feature {f} · {self.hook}", asset_prefix="../assets/")
            (root / "features" / f"{f}.html").write_text(page, encoding="utf-8")
        index = {
            "kind": "index",
            "hook": self.hook,
            "stream": self.stream,
            "sae_label": self.sae_label,
            "n_tokens": self.n_tokens,
            "features": index_rows,
            "page_pattern": "features/{feature}.html",
        }
        (root / "index.html").write_text(render_page(index, f"Features · {self.hook}", asset_prefix="assets/"))
        manifest = {
            "format": "t5hooks-dashboard",
            "version": 1,
            "store": str(self.store.path.resolve()),
            "hook": self.hook,
            "sae": {
                "architecture": getattr(self.sae, "architecture", None),
                "d_in": self.sae.d_in,
                "d_sae": self.sae.d_sae,
            },
            "n_tokens": self.n_tokens,
            "features_with_pages": len(chosen),
            **timing,
        }
        (root / SITE_MARKER).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def _host(slots: Any) -> dict[str, np.ndarray]:
    """A `_Slots`'s arrays on the host, activations as short decimals (NaN outside documents)."""
    return {
        "filled": slots.filled.cpu().numpy(),
        "value": short_decimals(slots.value),
        "doc": slots.doc.cpu().numpy(),
        "pos": slots.pos.cpu().numpy(),
        "acts": short_decimals(slots.acts),
        "tokens": slots.tokens.cpu().numpy(),
    }


def _neighbours(W_dec: Tensor, chosen: list[int], k: int, chunk: int = 1024) -> dict[int, list[dict[str, Any]]]:
    """The `k` features with the most similar decoder directions (cosine), for each chosen feature."""
    unit = torch.nn.functional.normalize(W_dec.float(), dim=1)  # [F, d_in]
    k = min(k, len(unit) - 1)
    out = {}
    for s in range(0, len(chosen), chunk):
        ids = torch.tensor(chosen[s : s + chunk], device=unit.device)
        cos = unit[ids] @ unit.T  # [chunk, F]
        cos[torch.arange(len(ids)), ids] = float("-inf")
        values, index = cos.topk(k, dim=1) if k > 0 else (cos[:, :0], cos[:, :0].long())
        for f, vs, js in zip(ids.tolist(), short_decimals(values).tolist(), index.tolist()):
            out[f] = [{"feature": j, "cosine": v} for v, j in zip(vs, js)]
    return out


class _LogitEffect:
    """Tokens a decoder-stream feature promotes / suppresses: its decoder direction taken into the decoder
    residual stream (through W_O / W_out for head and MLP hooks) and read out by the model's own output path
    (`unembed_directions`: final RMSNorm, logit scaling where the model uses it, `W_U`). A direct effect: the
    layers between the hook and the output are not included."""

    def __init__(self, model: Any, hook: str, sae: Any, k: int, stream: str) -> None:
        self.model, self.k = model, k
        self.directions, self.note = None, ""
        self._cache: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        if stream != "decoder":
            self.note = "Logit effects are shown for decoder-stream features; this hook is in the encoder stream."
        elif model is None:
            self.note = "No logit effect: build the dashboard with the model (model= / --model) to compute it."
        else:
            self.directions, self.post_norm, self.note = residual_directions(model, hook, sae.W_dec.detach())

    def token_ids(self, chosen: list[int], chunk: int = 256) -> list[int]:
        ids: list[int] = []
        for s in range(0, len(chosen), chunk):
            part = chosen[s : s + chunk]
            effect = self._logits(torch.tensor(part))
            k = min(self.k, effect.shape[1])
            up, down = effect.topk(k, dim=1), (-effect).topk(k, dim=1)
            up_v, down_v = short_decimals(up.values).tolist(), short_decimals(-down.values).tolist()
            up_i, down_i = up.indices.tolist(), down.indices.tolist()
            for i, f in enumerate(part):
                self._cache[f] = (up_i[i], up_v[i], down_i[i], down_v[i])
            ids += up.indices.flatten().tolist() + down.indices.flatten().tolist()
        return ids

    def _logits(self, features: Tensor) -> Tensor:  # [n, d_vocab]
        model = self.model
        d = self.directions[features.to(self.directions.device)].to(model.W_U.dtype)
        with torch.no_grad():
            logits = d @ model.W_U if self.post_norm else unembed_directions(model, d)
        return logits.float().cpu()

    def of(self, f: int, strings: dict[int, str]) -> dict[str, Any]:
        if self.directions is None or f not in self._cache:
            return {"note": self.note}
        up_i, up_v, down_i, down_v = self._cache[f]
        return {
            "promoted": [[strings[i], v] for i, v in zip(up_i, up_v)],
            "suppressed": [[strings[i], v] for i, v in zip(down_i, down_v)],
            "note": self.note,
        }


def unembed_directions(model: Any, directions: Tensor) -> Tensor:  # [n, d_model] -> [n, d_vocab]
    """The logits the model's own output path gives a final decoder residual pointing along each direction: its
    decoder final RMSNorm (weight included), T5's `d_model**-0.5` logit scaling where the model uses it, and
    `W_U` -- the modules `decode` runs. RMSNorm is scale-free, so a direction's length does not matter."""
    with torch.no_grad():
        normalised = model.decoder_final_ln(directions[None])  # [1, n, d_model]
        return model.unembed(normalised, model.embed.W_E)[0]


_RESIDUAL_LEAVES = {
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_mid_cross",
    "hook_resid_post",
    "hook_attn_out",
    "hook_cross_attn_out",
    "hook_mlp_out",
    "hook_mlp_in",
}


def residual_directions(model: Any, hook: str, W_dec: Tensor) -> tuple[Tensor | None, bool, str]:
    """Each feature's decoder row as a direction in the decoder residual stream (`[d_sae, d_model]`), whether
    it is read after the final norm already (`unembed.hook_in`), and a note for the page."""
    parts = hook.split(".")
    note = "Logits the model's output path (final RMSNorm"
    note += ", d_model**-0.5 logit scaling" if getattr(model.unembed, "scale", None) is not None else ""
    note += ", W_U) gives a final residual along the feature's decoder direction (direct effect: the layers after "
    note += "the hook are not included)."
    if hook == "unembed.hook_in":
        return (
            W_dec,
            True,
            "The feature's decoder direction times W_U (this hook is read after the final norm and scaling).",
        )
    if hook == "hook_decoder_embed" or (len(parts) == 3 and parts[0] == "decoder" and parts[2] in _RESIDUAL_LEAVES):
        return W_dec, False, note
    if len(parts) == 4 and parts[0] == "decoder" and parts[2] in ("attn", "cross_attn"):
        attn = model.mod_dict[".".join(parts[:3])]
        W_O = attn.W_O.detach()  # [H, d_head, d_model]
        H, d_head, _ = W_O.shape
        if parts[3] == "hook_z":
            dirs = torch.einsum("fhd,hdm->fm", W_dec.reshape(-1, H, d_head).to(W_O.dtype), W_O)
            return dirs, False, note.replace("direction (", "direction through W_O (")
        if parts[3] == "hook_result":
            return W_dec.reshape(len(W_dec), H, -1).sum(1), False, note
    if len(parts) == 4 and parts[0] == "decoder" and parts[2] == "mlp" and parts[3] == "hook_post":
        W_out = model.mod_dict[".".join(parts[:3])].W_out.detach()  # [d_mlp, d_model]
        return W_dec.to(W_out.dtype) @ W_out, False, note.replace("direction (", "direction through W_out (")
    return None, False, f"No logit effect: {hook} does not write into the decoder residual stream."
