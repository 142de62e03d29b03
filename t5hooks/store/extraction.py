"""extract(): run a corpus through a model's capture module and store the activations of real tokens.

The corpus is read in windows of `window` prompts (per rank). Each window is tokenised, sorted by length
and cut into token-budget batches (windows.py), run through the capture runner (runner.py: compiled, eager,
the encoder stack alone, or an exported ONNX graph in ONNX Runtime), and its real-token rows are written as
one shard, ordered by (doc, pos). A window is the unit of resumption: its shard is renamed into place, then
the rank's progress file records the window's input range (manifest.py). Killed at any point and re-run,
extraction continues after the last recorded window, and because windows and batches are a pure function of
the source, the final store equals an uninterrupted run row for row. Under torchrun, rank r takes the
prompts with `doc % world_size == r`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from ..atomic import LOCK_NAME, FolderLock, exclusive_lock
from .config import ExtractConfig
from .format import (
    AXES,
    STORAGE_DTYPES,
    index_key,
    model_fingerprint,
    shard_name,
    storage_dtype_name,
    write_json,
    write_shard,
)
from .manifest import load_progress, open_store
from .runner import CaptureRunner, needs_decoder, probe_shapes, runner_for
from .sources import Source, check_digest, open_source
from .windows import chunks, encode_window, run_window


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
    backend: str = ""  # what ran the forward ("auto": what it chose and when)

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
        backend = f"; backend {self.backend}" if self.backend else ""
        return (
            f"extracted{rank} {self.prompts} prompts, {self.real_tokens} real tokens in {self.seconds:.1f} s "
            f"({self.tokens_per_second:,.0f} tokens/s, padding {100 * self.padding_fraction:.1f}%), "
            f"{self.shards_written} shards{resumed}{skipped} -> {self.out_dir}{backend}"
        )


def extract(
    model: Any,
    source: Any,
    names: Any,
    out_dir: str | os.PathLike,
    config: ExtractConfig | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    **settings: Any,
) -> ExtractSummary:
    """Run `source` through `model` and store the activations of `names` for every real token.

    `source`: a .txt file (one prompt a line), a .jsonl file (`field`, optional `decoder_field` for decoder
    targets, fed teacher-forced), a `datasets` dataset object / hub name / saved directory (`split`,
    `streaming`), or a list of strings. `names`: hook names or globs (encoder, decoder and cross-attention
    hooks in one forward). Prompts longer than `max_tokens` are an error unless `truncate`; empty prompts
    are an error unless `skip_empty`. `dtype`: storage dtype (float32 / bfloat16 / float16; default the
    model's). Batches hold at most `token_budget` padded tokens, bucketed by length within a look-ahead
    `window` of prompts (also the shard size; memory holds one window's rows: about
    `window * mean_tokens * sum(d) * bytes`, so lower it for many wide hooks). `backend`: "auto" (the
    default: run eagerly, and switch to the compiled capture once the measured eager speed shows that the rest
    of the job pays for compiling, `compile_policy`; on CPU, where compiling a forward buys little, that is
    rarely), "eager", "compile" (`compile_capture`: regional, warm-started from the compile cache) or "onnx"
    (exported once, run in ONNX Runtime). `format="saelens"` also packs the store into SAELens's
    cached-activations dataset (`context_size` tokens per row) in `out_dir`; the resumable native store
    then lives in `out_dir/native`. Re-running the same call resumes; a different model, hook set, source
    or setting under an existing store is a ValueError. Under torchrun each rank extracts its slice.
    """
    t_start = time.perf_counter()
    config = ExtractConfig(**settings) if config is None else dataclasses.replace(config, **settings)
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("extract tokenises text with the model's tokenizer; this model has none (tokenizer=...)")
    resolved = _resolve_names(model, names)
    axes = {name: model.layout.token_stream(name) for name in resolved}
    rank, world_size = _rank_and_world(rank, world_size)
    src = open_source(source, config.field, config.decoder_field, split=config.split, streaming=config.streaming)
    storage = storage_dtype_name(config.dtype, _model_dtype(model))
    if config.format == "saelens":
        from .saelens import check_saelens_compatible

        check_saelens_compatible(axes, storage)

    root = Path(out_dir)
    store_dir = root / "native" if config.format == "saelens" else root
    for folder in (root, store_dir):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"out_dir {folder} exists and is not a directory")
    shapes = probe_shapes(model, resolved, axes)
    manifest = {
        "model": model_fingerprint(model),
        "hooks": {name: {"axis": axes[name], "shape": list(shapes[name])} for name in resolved},
        "source": src.fingerprint(),
        **config.manifest_settings(storage, world_size),
    }
    # one writer per rank of a store: a second extract into the folder is refused, naming the first
    purpose = f"t5hooks extract{f' (rank {rank} of {world_size})' if world_size > 1 else ''} into {root}"
    with exclusive_lock(store_dir, purpose, name=f"{LOCK_NAME}-rank{rank}") as lock:
        open_store(store_dir, root, manifest, config.format, rank)
        progress_path, state = load_progress(store_dir, rank, world_size)

        summary = ExtractSummary(out_dir=root, rank=rank, world_size=world_size)
        summary.windows_resumed = len(state["windows"])
        if state.get("complete"):
            check_digest(state.get("source"), src.whole_digest(), "this store")
        else:
            weights = manifest["model"]["weights_sample_sha256"]
            runner = runner_for(model, shapes, config.backend, needs_decoder(model, axes, src), weights)
            _extract_windows(
                runner, model, src, axes, config, STORAGE_DTYPES[storage], store_dir, progress_path, state, summary,
                t_start, rank=rank, world_size=world_size, lock=lock,
            )  # fmt: skip
            summary.backend = runner.describe()
        if config.format == "saelens":
            from .saelens import pack_when_complete

            summary.saelens_dir = pack_when_complete(store_dir, root, config.context_size, rank, world_size)
    summary.seconds = time.perf_counter() - t_start
    return summary


def _extract_windows(
    runner: CaptureRunner,
    model: Any,
    src: Source,
    axes: dict[str, str],
    config: ExtractConfig,
    storage: torch.dtype,
    store_dir: Path,
    progress_path: Path,
    state: dict[str, Any],
    summary: ExtractSummary,
    t_start: float,
    *,
    rank: int,
    world_size: int,
    lock: FolderLock,
) -> None:
    from tqdm.auto import tqdm

    window = config.window
    done_windows = len(state["windows"])
    mine = (p for p in src if p.doc % world_size == rank)
    if done_windows:  # resume: skip the recorded input ranges, checking they read as they did
        for _ in islice(mine, done_windows * window):
            pass
        check_digest(state["windows"][-1].get("source"), src.digest(), f"window {done_windows - 1}")
    total = _rank_total(src, rank, world_size)
    bar = tqdm(
        total=total,
        initial=min(done_windows * window, total) if total is not None else done_windows * window,
        unit="prompt",
        desc=f"extract{f' rank {rank}' if world_size > 1 else ''}",
        disable=not config.progress,
        dynamic_ncols=True,
    )
    tokenizer = model.tokenizer
    eos = getattr(tokenizer, "eos_token_id", None)
    start_id = runner.start_id
    pad_id = getattr(model.cfg, "pad_token_id", 0) or 0
    index = done_windows
    if total is not None:  # what backend "auto" weighs compiling against
        runner.prompts_to_run = max(total - done_windows * window, 0)
    with torch.inference_mode():
        for chunk in chunks(mine, window):
            encoded, skipped = encode_window(
                chunk, tokenizer, eos, start_id, config.max_tokens, config.truncate, config.skip_empty
            )
            rows, n_real, n_padded = run_window(
                runner, encoded, axes, config.token_budget, config.max_batch, pad_id, storage, on_batch=bar.update
            )
            lock.check()  # still this store's writer (LockLost otherwise): nothing of another run is overwritten
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
                "source": src.digest(),  # the hash of the source up to this window's last prompt (files)
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
            bar.update(skipped)  # the prompts run were counted batch by batch
            elapsed = time.perf_counter() - t_start
            bar.set_postfix_str(
                f"{summary.real_tokens / max(elapsed, 1e-9):,.0f} real tok/s, pad {100 * summary.padding_fraction:.0f}%"
            )
    bar.close()
    state["complete"] = True
    state["source"] = src.digest()  # the whole source, read to its end
    write_json(progress_path, state)


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


def _rank_total(src: Source, rank: int, world_size: int) -> int | None:
    try:
        n = len(src)
    except TypeError:
        return None
    return len(range(rank, n, world_size))
