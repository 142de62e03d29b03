"""extract(): run a corpus through a model's capture module and store the activations of real tokens.

The corpus is read in windows of `window` prompts (per rank). Each window is tokenised, sorted by length
and cut into token-budget batches (batching.py), run through `model.capture(names)` (the encoder stack alone,
`EncoderCaptureModule`, when only encoder hooks are asked for; compiled, eager, or an exported ONNX graph in
ONNX Runtime), and its real-token rows are written as one shard, ordered by (doc, pos).
A window is the unit of resumption: its shard is renamed into place, then the rank's progress file records
the window's input range. Killed at any point and re-run, extraction continues after the last recorded
window, and because windows and batches are a pure function of the source, the final store equals an
uninterrupted run row for row. Under torchrun, rank r takes the prompts with `doc % world_size == r`.
"""

from __future__ import annotations

import os
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic import remove_stale_temps
from .batching import padded_tokens, plan_batches
from .format import (
    AXES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    STORAGE_DTYPES,
    describe_difference,
    index_key,
    model_fingerprint,
    progress_name,
    read_json,
    shard_name,
    storage_dtype_name,
    token_axis,
    write_json,
    write_shard,
)
from .sources import Prompt, Source, open_source

BACKENDS = ("compile", "eager", "onnx")
MANIFEST_WAIT_S = 600.0  # how long ranks > 0 wait for rank 0 to create the store (it loads and probes first)
FORMATS = ("native", "saelens")


@dataclass
class ExtractSummary:
    """What one `extract` call did (this rank)."""

    out_dir: Path
    rank: int
    world_size: int
    prompts: int = 0  # stored by this call
    skipped_empty: int = 0
    real_tokens: int = 0  # encoder tokens stored
    padded_tokens: int = 0  # encoder tokens computed (real + padding)
    seconds: float = 0.0
    shards_written: int = 0
    windows_resumed: int = 0  # windows found complete and skipped
    saelens_dir: Path | None = None
    files: list[str] = field(default_factory=list)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        rank = f" [rank {self.rank}/{self.world_size}]" if self.world_size > 1 else ""
        resumed = f", {self.windows_resumed} windows already done" if self.windows_resumed else ""
        skipped = f", {self.skipped_empty} empty skipped" if self.skipped_empty else ""
        return (
            f"extracted{rank} {self.prompts} prompts, {self.real_tokens} real tokens in {self.seconds:.1f} s "
            f"({self.tokens_per_second:,.0f} tokens/s, padding {100 * self.padding_fraction:.1f}%), "
            f"{self.shards_written} shards{resumed}{skipped} -> {self.out_dir}"
        )


@dataclass
class _Encoded:
    doc: int
    tokens: list[int]
    decoder_tokens: list[int] | None


def extract(
    model: Any,
    source: Any,
    names: Any,
    out_dir: str | os.PathLike,
    *,
    format: str = "native",
    context_size: int | None = None,
    dtype: torch.dtype | str | None = None,
    field: str = "text",
    decoder_field: str | None = None,
    split: str = "train",
    streaming: bool = False,
    max_tokens: int = 512,
    truncate: bool = False,
    skip_empty: bool = False,
    token_budget: int = 8192,
    max_batch: int | None = None,
    window: int = 1024,
    backend: str = "compile",
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> ExtractSummary:
    """Run `source` through `model` and store the activations of `names` for every real token.

    `source`: a .txt file (one prompt a line), a .jsonl file (`field`, optional `decoder_field` for decoder
    targets, fed teacher-forced), a `datasets` dataset object / hub name / saved directory (`split`,
    `streaming`), or a list of strings. `names`: hook names or globs (encoder, decoder and cross-attention
    hooks in one forward). Prompts longer than `max_tokens` are an error unless `truncate`; empty prompts
    are an error unless `skip_empty`. `dtype`: storage dtype (float32 / bfloat16 / float16; default the
    model's). Batches hold at most `token_budget` padded tokens, bucketed by length within a look-ahead
    `window` of prompts (also the shard size; memory holds one window's rows: about
    `window * mean_tokens * sum(d) * bytes`, so lower it for many wide hooks). `backend`: "compile" (torch.compile, fullgraph), "eager",
    or "onnx" (exported once, run in ONNX Runtime). `format="saelens"` also packs the store into SAELens's
    cached-activations dataset (`context_size` tokens per row) in `out_dir`; the resumable native store
    then lives in `out_dir/native`. Re-running the same call resumes; a different model, hook set, source
    or setting under an existing store is a ValueError. Under torchrun each rank extracts its slice.
    """
    t_start = time.perf_counter()
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; valid: {', '.join(FORMATS)}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; valid: {', '.join(BACKENDS)}")
    if format == "saelens" and (context_size is None or context_size < 1):
        raise ValueError("format='saelens' needs context_size (tokens per packed row, e.g. 128)")
    for label, value in (("window", window), ("token_budget", token_budget), ("max_tokens", max_tokens)):
        if value < 1:
            raise ValueError(f"{label} must be positive, got {value}")
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("extract tokenises text with the model's tokenizer; this model has none (tokenizer=...)")
    resolved = _resolve_names(model, names)
    axes = {name: token_axis(model, name) for name in resolved}
    rank, world_size = _rank_and_world(rank, world_size)
    src = open_source(source, field, decoder_field, split=split, streaming=streaming)
    storage = storage_dtype_name(dtype, _model_dtype(model))
    if format == "saelens":
        from .saelens import check_saelens_compatible

        check_saelens_compatible(axes, storage)

    root = Path(out_dir)
    store_dir = root / "native" if format == "saelens" else root
    shapes = _probe_shapes(model, resolved, axes)
    config = {
        "model": model_fingerprint(model),
        "hooks": {name: {"axis": axes[name], "shape": list(shapes[name])} for name in resolved},
        "source": src.fingerprint(),
        # truncate / skip_empty are not recorded: a finished window never held an over-long or empty prompt
        # that they would treat differently, so a run stopped by one may continue with --truncate/--skip-empty.
        "tokenization": {"max_tokens": max_tokens},
        "dtype": storage,
        "window": window,
        "world_size": world_size,
        **({"saelens_context_size": context_size} if format == "saelens" else {}),
    }
    _open_store(store_dir, root, config, format, rank)
    progress_path = store_dir / progress_name(rank, world_size)
    state = read_json(progress_path) if progress_path.exists() else {"rank": rank, "world_size": world_size}
    state.setdefault("windows", [])
    _check_windows(state["windows"], progress_path)
    # what a killed run of this rank may have left half-written: the next shard, the progress file (manifest: rank 0)
    for final in [store_dir / shard_name(rank, len(state["windows"])), progress_path]:
        remove_stale_temps(final)
    if rank == 0:
        remove_stale_temps(store_dir / MANIFEST)

    summary = ExtractSummary(out_dir=root, rank=rank, world_size=world_size)
    summary.windows_resumed = len(state["windows"])
    if not state.get("complete"):
        weights = config["model"]["weights_sample_sha256"]
        runner = _runner_for(model, shapes, backend, _needs_decoder(model, axes, src), weights)
        _extract_windows(
            runner, model, src, axes, store_dir, progress_path, state, summary, t_start,
            rank=rank, world_size=world_size, window=window, storage=STORAGE_DTYPES[storage],
            max_tokens=max_tokens, truncate=truncate, skip_empty=skip_empty, token_budget=token_budget,
            max_batch=max_batch, progress=progress,
        )  # fmt: skip
    if format == "saelens":
        from .saelens import pack_when_complete

        summary.saelens_dir = pack_when_complete(store_dir, root, context_size, rank, world_size)
    summary.seconds = time.perf_counter() - t_start
    return summary


def _extract_windows(
    runner: _Runner,
    model: Any,
    src: Source,
    axes: dict[str, str],
    store_dir: Path,
    progress_path: Path,
    state: dict[str, Any],
    summary: ExtractSummary,
    t_start: float,
    *,
    rank: int,
    world_size: int,
    window: int,
    storage: torch.dtype,
    max_tokens: int,
    truncate: bool,
    skip_empty: bool,
    token_budget: int,
    max_batch: int | None,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    done_windows = len(state["windows"])
    mine = (p for p in src if p.doc % world_size == rank)
    mine = islice(mine, done_windows * window, None)  # resume: skip the recorded input ranges
    total = _rank_total(src, rank, world_size)
    bar = tqdm(
        total=total,
        initial=min(done_windows * window, total) if total is not None else done_windows * window,
        unit="prompt",
        desc=f"extract{f' rank {rank}' if world_size > 1 else ''}",
        disable=not progress,
        dynamic_ncols=True,
    )
    tokenizer = model.tokenizer
    eos = getattr(tokenizer, "eos_token_id", None)
    start_id = runner.start_id
    pad_id = getattr(model.cfg, "pad_token_id", 0) or 0
    index = done_windows
    with torch.inference_mode():
        for chunk in _chunks(mine, window):
            encoded, skipped = _encode(chunk, tokenizer, eos, start_id, max_tokens, truncate, skip_empty)
            rows, n_real, n_padded = _run_window(runner, encoded, axes, token_budget, max_batch, pad_id, storage)
            path = store_dir / shard_name(rank, index)
            record = {
                "window": index,
                "local_range": [index * window, index * window + len(chunk)],  # this rank's prompts [lo, hi)
                "docs": [chunk[0].doc, chunk[-1].doc],  # first and last source index in the window
                "file": path.name,
                "prompts": len(encoded),
                "skipped_empty": skipped,
                "rows": {a: int(rows[index_key(a, "doc")].numel()) for a in AXES if index_key(a, "doc") in rows},
                "real_tokens": n_real,
                "padded_tokens": n_padded,
            }
            write_shard(path, rows, record)
            state["windows"].append(record)
            write_json(progress_path, state)  # the window counts as done only from here on
            index += 1
            summary.prompts += len(encoded)
            summary.skipped_empty += skipped
            summary.real_tokens += n_real
            summary.padded_tokens += n_padded
            summary.shards_written += 1
            summary.files.append(path.name)
            bar.update(len(chunk))
            elapsed = time.perf_counter() - t_start
            bar.set_postfix_str(
                f"{summary.real_tokens / max(elapsed, 1e-9):,.0f} real tok/s, pad {100 * summary.padding_fraction:.0f}%"
            )
            _maybe_stop_for_test(index)
    bar.close()
    state["complete"] = True
    write_json(progress_path, state)


def _maybe_stop_for_test(windows_done: int) -> None:
    """Test hook: T5HOOKS_EXTRACT_KILL_AFTER=N makes the process SIGKILL itself after N windows (this run),
    so the resume test kills at a controlled point with no chance to clean up."""
    limit = os.environ.get("T5HOOKS_EXTRACT_KILL_AFTER")
    if limit is not None and windows_done >= int(limit):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _run_window(
    runner: _Runner,
    encoded: list[_Encoded],
    axes: dict[str, str],
    token_budget: int,
    max_batch: int | None,
    pad_id: int,
    storage: torch.dtype,
) -> tuple[dict[str, Tensor], int, int]:
    """All batches of one window -> the shard's tensors (rows ordered by doc, then pos)."""
    used_axes = [a for a in AXES if a in axes.values()]
    lengths = [len(e.tokens) for e in encoded]
    batches = plan_batches(lengths, token_budget, max_batch)
    parts: dict[str, list[Tensor]] = {}
    for batch in batches:
        items = [encoded[i] for i in batch]
        out, inputs = runner.run(items, pad_id)
        for axis in used_axes:
            tokens, mask = inputs[axis]  # [B,L], [B,L] bool (real tokens)
            docs = torch.tensor([e.doc for e in items], dtype=torch.int64)[:, None].expand_as(tokens)
            pos = torch.arange(tokens.shape[1], dtype=torch.int32)[None].expand_as(tokens)
            parts.setdefault(index_key(axis, "doc"), []).append(docs[mask])
            parts.setdefault(index_key(axis, "pos"), []).append(pos[mask])
            parts.setdefault(index_key(axis, "token_id"), []).append(tokens[mask].to(torch.int32))
        for name, axis in axes.items():
            act = out[name]  # [B,L,*shape]
            _, mask = inputs[axis]
            if act.shape[:2] != mask.shape:
                raise RuntimeError(f"{name} has shape {tuple(act.shape)}; expected [batch, {axis} positions, ...]")
            parts.setdefault(name, []).append(act[mask.to(act.device)].to("cpu", storage))
    rows: dict[str, Tensor] = {}
    for axis in used_axes:
        if not batches:  # every prompt of the window was skipped: an empty shard keeps the windows contiguous
            rows[index_key(axis, "doc")] = torch.zeros(0, dtype=torch.int64)
            rows[index_key(axis, "pos")] = rows[index_key(axis, "token_id")] = torch.zeros(0, dtype=torch.int32)
            for name in (n for n, a in axes.items() if a == axis):
                rows[name] = torch.zeros(0, *runner.shapes[name], dtype=storage)
            continue
        order = torch.argsort(torch.cat(parts[index_key(axis, "doc")]), stable=True)  # back to source order
        for key in [
            *(index_key(axis, c) for c in ("doc", "pos", "token_id")),
            *(n for n, a in axes.items() if a == axis),
        ]:
            rows[key] = torch.cat(parts[key])[order]
    real = sum(lengths)
    return rows, real, padded_tokens(lengths, batches)


_RUNNERS: weakref.WeakKeyDictionary[Any, dict[tuple, _Runner]] = weakref.WeakKeyDictionary()


def _runner_for(
    model: Any, shapes: dict[str, tuple[int, ...]], backend: str, needs_decoder: bool, weights: str
) -> _Runner:
    """One runner per (model, hooks, backend, weights) and process: later extract calls reuse the compiled graph
    or the ONNX session (an exported snapshot of the weights, hence the weights' hash in the key)."""
    key = (tuple(shapes), backend, needs_decoder, weights)
    runners = _RUNNERS.setdefault(model, {})
    if key not in runners:
        start_id = getattr(model.cfg, "decoder_start_token_id", 0)
        runners[key] = _Runner(model, shapes, backend, needs_decoder, start_id)
    return runners[key]


class _Runner:
    """One forward of a padded batch through the chosen backend -> activations on the host."""

    def __init__(
        self,
        model: Any,
        shapes: dict[str, tuple[int, ...]],  # hook name -> per-token shape
        backend: str,
        needs_decoder: bool,
        start_id: int,
    ) -> None:
        self.names, self.shapes = list(shapes), shapes
        self.backend, self.needs_decoder, self.start_id = backend, needs_decoder, start_id
        self.device = next(model.parameters()).device
        self.encoder_only = False
        if backend == "onnx":
            from ..export import OnnxRunner, to_onnx

            self._tmp = tempfile.TemporaryDirectory(prefix="t5hooks-extract-")
            path = to_onnx(model, Path(self._tmp.name) / "capture.onnx", capture=self.names)
            self.fn = OnnxRunner(path, providers=["CPUExecutionProvider"])
            self.needs_decoder = hasattr(model, "decode")  # an encoder-decoder graph always takes a decoder input
        else:
            # only encoder-stack hooks and no decoder input: run the encoder alone (no decoder, no logits)
            self.encoder_only = not needs_decoder and _encoder_stack_only(model, self.names)
            if self.encoder_only and hasattr(model, "decode"):
                from ..capture import EncoderCaptureModule

                cap = EncoderCaptureModule(model, self.names).eval()
            else:
                cap = model.capture(self.names).eval()  # an encoder-only model's capture runs just the encoder
            self.fn = torch.compile(cap, fullgraph=True, dynamic=True) if backend == "compile" else cap

    def run(self, items: list[_Encoded], pad_id: int) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
        tokens, mask = _pad([e.tokens for e in items], pad_id)  # [B,E]
        inputs = {"encoder": (tokens, mask)}
        dec = dec_mask = None
        if self.needs_decoder:
            dec_rows = [e.decoder_tokens or [self.start_id] for e in items]
            dec, dec_mask = _pad(dec_rows, pad_id)  # [B,D]
        else:
            dec_mask = torch.ones(len(items), 1, dtype=torch.bool)  # the model's default: one start token
            dec = torch.full((len(items), 1), self.start_id, dtype=torch.long)
        inputs["decoder"] = (dec, dec_mask)
        if self.backend == "onnx":
            feeds = dict(input=tokens, one_zero_attention_mask=mask.long())
            if self.needs_decoder:  # a HookedT5Encoder's graph takes no decoder input
                feeds.update(decoder_input=dec, decoder_attention_mask=dec_mask.long())
            out = {k: torch.from_numpy(v) for k, v in self.fn(**feeds).items()}
        elif self.encoder_only:
            out = self.fn(tokens.to(self.device), one_zero_attention_mask=mask.long().to(self.device))
        else:
            d = self.device
            args = (tokens.to(d), dec.to(d) if self.needs_decoder else None, mask.long().to(d))
            out = self.fn(*args, dec_mask.long().to(d)) if self.needs_decoder else self.fn(*args)
        return out, inputs


def _pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return tokens, mask


def _encode(
    chunk: list[Prompt],
    tokenizer: Any,
    eos: int | None,
    start_id: int,
    max_tokens: int,
    truncate: bool,
    skip_empty: bool,
) -> tuple[list[_Encoded], int]:
    """Tokenise one window; empty and over-long prompts are errors unless skipped / truncated."""
    kept = []
    for p in chunk:
        if not p.text.strip():
            if skip_empty:
                continue
            raise ValueError(
                f"prompt {p.doc} (line {p.doc + 1}) is empty; pass skip_empty=True (--skip-empty) to skip empty prompts"
            )
        kept.append(p)
    if not kept:
        return [], len(chunk)
    ids = _tokenize(tokenizer, [p.text for p in kept])
    has_dec = any(p.decoder_text is not None for p in kept)
    dec_ids = _tokenize(tokenizer, [p.decoder_text or "" for p in kept]) if has_dec else None
    out = []
    for i, p in enumerate(kept):
        toks = _fit(ids[i], p, "prompt", eos, max_tokens, truncate)
        dec = None
        if dec_ids is not None:  # teacher forcing: start token, then the target without its last token
            labels = _fit(dec_ids[i], p, "decoder target", eos, max_tokens, truncate)
            dec = [start_id, *labels[:-1]]
        out.append(_Encoded(p.doc, toks, dec))
    return out, len(chunk) - len(kept)


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    ids = tokenizer(texts, padding=False)["input_ids"]
    return [list(map(int, row)) for row in ids]


def _fit(ids: list[int], p: Prompt, what: str, eos: int | None, max_tokens: int, truncate: bool) -> list[int]:
    if len(ids) <= max_tokens:
        return ids
    if not truncate:
        raise ValueError(
            f"{what} {p.doc} (line {p.doc + 1}) has {len(ids)} tokens > max_tokens={max_tokens}; pass "
            f"truncate=True (--truncate) to cut it, or raise max_tokens (--max-tokens)"
        )
    if eos is not None and ids[-1] == eos:  # keep the end-of-sequence token, as tokenizers do when truncating
        return [*ids[: max_tokens - 1], eos]
    return ids[:max_tokens]


def _chunks(prompts: Iterator[Prompt], size: int) -> Iterator[list[Prompt]]:
    while chunk := list(islice(prompts, size)):
        yield chunk


def _resolve_names(model: Any, names: Any) -> list[str]:
    if names is None or (not isinstance(names, str) and not callable(names) and len(names) == 0):
        raise ValueError("names is empty: give hook names or globs, e.g. 'encoder.*.hook_resid_post'")
    resolved = list(model.resolve_names(names))  # unknown names: ValueError with close matches
    if not resolved:
        raise ValueError(f"{names!r} matches no hook point")
    return resolved


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


def _model_dtype(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


def _needs_decoder(model: Any, axes: dict[str, str], src: Source) -> bool:
    """A decoder input is built only when a decoder hook is asked for or the source has decoder targets;
    an encoder-decoder otherwise runs its default one-token decoder (encoder-only models run none)."""
    has_decoder = getattr(model.cfg, "n_decoder_layers", 0) > 0 and hasattr(model, "decode")
    return has_decoder and ("decoder" in axes.values() or src.has_decoder)


def _encoder_stack_only(model: Any, names: list[str]) -> bool:
    layout = getattr(model, "layout", None)
    return layout is not None and all(layout.spec(name).stack == "encoder" for name in names)


def _probe_shapes(model: Any, names: list[str], axes: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Per-token shape of every hook from one tiny eager forward (E=3, D=2); checks the token axis too."""
    device = next(model.parameters()).device
    cap = model.capture(names)
    tokens = torch.ones(1, 3, dtype=torch.long, device=device)
    with torch.inference_mode():
        if getattr(model.cfg, "n_decoder_layers", 0) > 0 and hasattr(model, "decode"):
            dec = torch.zeros(1, 2, dtype=torch.long, device=device)
            out = cap(tokens, dec)
        else:
            out = cap(tokens)
    expected = {"encoder": 3, "decoder": 2}
    shapes = {}
    for name in names:
        shape = tuple(out[name].shape)
        if len(shape) < 2 or shape[0] != 1 or shape[1] != expected[axes[name]]:
            raise ValueError(f"{name!r} has shape {shape}; the store keeps per-token activations [batch, pos, ...]")
        shapes[name] = shape[2:]
    return shapes


def _open_store(store_dir: Path, root: Path, config: dict[str, Any], format: str, rank: int) -> None:
    """Create the store, or check that the existing one was made by the same model / hooks / source / settings.
    Only rank 0 creates it (and cleans its stale temp files); the other ranks wait for its manifest."""
    manifest_path = store_dir / MANIFEST
    if rank != 0:
        _wait_for(manifest_path, MANIFEST_WAIT_S)
    if manifest_path.exists():
        manifest = read_json(manifest_path)
        if manifest.get("format") != FORMAT_NAME:
            raise ValueError(f"{manifest_path} is not a t5hooks activation store manifest")
        diffs = describe_difference(manifest.get("config", {}), config)
        if diffs:
            raise ValueError(
                f"{store_dir} holds a store made with different settings; refusing to mix them "
                f"(use another out_dir, or delete this one):\n  " + "\n  ".join(diffs)
            )
        return
    for folder in {root, store_dir}:
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"out_dir {folder} exists and is not a directory")
        ours = lambda e: e.name.startswith((".", "progress-", "shard-")) or e.name in (MANIFEST, "native")
        foreign = [e.name for e in folder.iterdir() if not ours(e)] if folder.is_dir() else []
        if foreign:
            raise ValueError(
                f"out_dir {folder} is not empty and holds no t5hooks store (found {sorted(foreign)[:5]}); "
                f"choose an empty or new directory"
            )
    store_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        manifest_path, {"format": FORMAT_NAME, "version": FORMAT_VERSION, "output_format": format, "config": config}
    )


def _wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0 did not create {path} within {timeout_s:.0f} s (see rank 0's error)")
        time.sleep(0.05)


def _check_windows(windows: list[dict[str, Any]], path: Path) -> None:
    for i, record in enumerate(windows):
        if record.get("window") != i:
            raise ValueError(f"{path}: window records are not contiguous from 0 (entry {i} is {record.get('window')})")


def _rank_total(src: Source, rank: int, world_size: int) -> int | None:
    try:
        n = len(src)
    except TypeError:
        return None
    return len(range(rank, n, world_size))
