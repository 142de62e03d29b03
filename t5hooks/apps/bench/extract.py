"""Extraction benchmark (`t5hooks bench extract`): t5hooks extract against the hand-rolled loop.

The corpus: seeded prompts with log-normal lengths clipped to 4..256 tokens (byte-level tokens, so both
sides tokenise identically), through a t5-small-shaped T5 v1.1 with random weights built from a T5Config.
Capture: every encoder layer's residual stream (`encoder.*.hook_resid_post`).

* hand-rolled: Hugging Face T5 encoder + forward hooks on every block, batches of `--batch` prompts in
  input order padded to the longest, real-token rows `torch.save`d per batch (what people write today).
* t5hooks extract: the capture module (compiled by default), token-budget batches bucketed by length,
  safetensors shards.

Both run in one process, interleaved (hand-rolled, extract, hand-rolled, ...), each after a warm-up pass
(so compilation is excluded and reported separately); medians are reported with the ratio. The outputs are
compared row by row. Peak memory is the largest RSS growth seen during a run (sampled every 2 ms).

    t5hooks bench extract               # 384 prompts, t5-small shape, 3 interleaved repeats
    t5hooks bench extract --quick       # a small model and corpus (smoke test)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import T5Config, T5ForConditionalGeneration

from t5hooks import HookedEncoderDecoder
from t5hooks.store import ActivationStore, extract
from t5hooks.tokenizer import ByteTokenizer

HOOKS = "encoder.*.hook_resid_post"


def seeded_corpus(n: int, seed: int = 0, lo: int = 4, hi: int = 256) -> list[str]:
    """`n` printable-ASCII prompts whose byte-token lengths (EOS included) are log-normal, clipped to lo..hi."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.empty(n).log_normal_(mean=3.6, std=0.8, generator=g).round().clamp(lo, hi).long()
    chars = "abcdefghijklmnopqrstuvwxyz     .,"
    out = []
    for length in lengths.tolist():
        picks = torch.randint(0, len(chars), (length - 1,), generator=g).tolist()
        out.append("".join(chars[i] for i in picks).strip().ljust(length - 1, "x"))
    return out


class PeakRSS:
    """Largest resident-set growth (bytes) over a `with` block, sampled by a thread."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hand_rolled(hf: Any, tokenizer: ByteTokenizer, texts: list[str], batch: int, out: Path) -> dict[str, Any]:
    """HF encoder + forward hooks, input order, padded batches; real-token rows saved per batch."""
    captured: dict[int, torch.Tensor] = {}
    handles = [
        block.register_forward_hook(lambda mod, args, output, i=i: captured.__setitem__(i, output[0]))
        for i, block in enumerate(hf.encoder.block)
    ]
    real = padded = 0
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch):
                enc = tokenizer(texts[start : start + batch], return_tensors="pt", padding=True)
                mask = enc["attention_mask"].bool()
                hf.encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                rows = {f"encoder.{i}.hook_resid_post": captured[i][mask] for i in sorted(captured)}
                torch.save(rows, out / f"batch-{start:06d}.pt")
                real += int(mask.sum())
                padded += mask.numel()
    finally:
        for h in handles:
            h.remove()
    return {"real": real, "padded": padded}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="t5hooks bench extract", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small model and corpus, one repeat (smoke test)")
    parser.add_argument("--prompts", type=int, default=None, help="corpus size (default 384; 48 with --quick)")
    parser.add_argument("--batch", type=int, default=16, help="hand-rolled batch size (default: %(default)s)")
    parser.add_argument("--token-budget", type=int, default=4096, help="extract's padded tokens per batch")
    parser.add_argument("--window", type=int, default=1024, help="extract's look-ahead window in prompts")
    parser.add_argument("--backend", choices=["compile", "eager", "onnx"], default="compile")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timed passes (default 3; 1 quick)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.prompts or (48 if args.quick else 384)
    repeats = args.repeats or (1 if args.quick else 3)
    small = dict(num_layers=2, d_model=64, d_ff=128, num_heads=4, d_kv=16) if args.quick else {}
    cfg = T5Config(
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0, **small
    )  # t5-small-shaped v1.1: d_model 512, 6+6 layers, 8 heads, d_ff 1024 (gated), vocab 32128
    torch.manual_seed(0)
    hf = T5ForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    tokenizer = ByteTokenizer()
    model = HookedEncoderDecoder.from_pretrained("t5-small-shape", hf_model=hf, tokenizer=tokenizer).eval()
    texts = seeded_corpus(n)
    n_tokens = sum(len(t) + 1 for t in texts)
    print(
        f"corpus: {n} prompts, {n_tokens} real tokens (log-normal lengths 4..256), model: T5 v1.1 "
        f"d_model {cfg.d_model}, {cfg.num_layers}+{cfg.num_decoder_layers} layers, capture {HOOKS}"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f} | torch {torch.__version__}, transformers {transformers.__version__}"
    )
    work = Path(tempfile.mkdtemp(prefix="t5hooks-bench-extract-"))
    kw = dict(token_budget=args.token_budget, window=args.window, backend=args.backend, progress=False)
    try:
        t = time.perf_counter()
        extract(model, texts[: min(n, 64)], HOOKS, work / "warm", **kw)  # compile (dynamic shapes) once
        warm_s = time.perf_counter() - t
        (work / "hf-warm").mkdir()
        hand_rolled(hf, tokenizer, texts[: args.batch], args.batch, work / "hf-warm")
        times: dict[str, list[float]] = {"hand": [], "extract": []}
        mem: dict[str, int] = {"hand": 0, "extract": 0}
        stats: dict[str, Any] = {}
        for r in range(repeats):
            hf_dir = work / f"hf-{r}"
            hf_dir.mkdir()
            with PeakRSS() as peak:
                t = time.perf_counter()
                stats["hand"] = hand_rolled(hf, tokenizer, texts, args.batch, hf_dir)
                times["hand"].append(time.perf_counter() - t)
            mem["hand"] = max(mem["hand"], peak.growth)
            with PeakRSS() as peak:
                t = time.perf_counter()
                summary = extract(model, texts, HOOKS, work / f"store-{r}", **kw)
                times["extract"].append(time.perf_counter() - t)
            mem["extract"] = max(mem["extract"], peak.growth)
            stats["extract"] = {"real": summary.real_tokens, "padded": summary.padded_tokens}
        max_diff = compare(work / "hf-0", ActivationStore(work / "store-0"), texts, args.batch)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nwarm-up extract ({args.backend}, includes compilation): {warm_s:.1f} s")
    print(f"{'':34} {'real tok/s':>11} {'padding':>8} {'peak RSS +MB':>13} {'median s':>9}")
    rate = {}
    for key, label in (
        ("hand", f"HF + forward hooks (batch {args.batch})"),
        ("extract", f"t5hooks extract ({args.backend})"),
    ):
        med = statistics.median(times[key])
        rate[key] = stats[key]["real"] / med
        pad = 1 - stats[key]["real"] / stats[key]["padded"]
        print(f"{label:34} {rate[key]:>11,.0f} {100 * pad:>7.1f}% {mem[key] / 2**20:>13.0f} {med:>9.2f}")
    print(f"\nspeed-up: {rate['extract'] / rate['hand']:.2f}x real tokens/s (interleaved medians of {repeats})")
    print(f"same outputs: max |extract - HF hooks| = {max_diff:.2e} over every stored row")
    return 0 if max_diff < 1e-3 else 1


def compare(hf_dir: Path, store: ActivationStore, texts: list[str], batch: int) -> float:
    """Largest difference between the hand-rolled rows and the store's (both in (doc, pos) order)."""
    worst = 0.0
    for name in store.names:
        ours = store.load(name)["acts"]
        theirs = torch.cat([torch.load(p, weights_only=True)[name] for p in sorted(hf_dir.glob("batch-*.pt"))])
        if ours.shape != theirs.shape:
            raise RuntimeError(
                f"{name}: extract stored {tuple(ours.shape)}, the hand-rolled loop {tuple(theirs.shape)}"
            )
        worst = max(worst, float((ours.float() - theirs.float()).abs().max()))
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
