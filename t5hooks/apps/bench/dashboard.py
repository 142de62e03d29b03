"""`t5hooks bench dashboard`: feature-dashboard cost against store size, on a t5-small-shaped store (d_model 512).

    t5hooks bench dashboard [--tokens 125000 250000 500000 1000000] [--d-sae 4096] [--dir /tmp/dash-bench]

The store is written in t5hooks's store format (manifest, progress file, safetensors shards of 1024 documents
of 40-160 tokens) with synthetic activations: Gaussian rows with a random low-rank structure, so an SAE's
features fire at realistic rates. The SAE is a ReLU SAE with unit-norm random decoder rows and encoder bias
-2.2 (about 1.5% of features active per token, an L0 near 60, as trained SAEs have). Each size builds the whole
site (index + a page per feature) from a fresh store; the pass (read, encode, statistics) and the site writing
are timed apart (wall clock), with the process's CPU time (user + system, all threads) beside the total: on a
shared machine wall time mostly measures the other jobs. Prints one markdown row per size with the load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch


def write_store(path: Path, n_tokens: int, d_model: int = 512, seed: int = 0) -> None:
    """A synthetic encoder-stream store of `n_tokens` rows of one hook, in the real on-disk format."""
    from ...store.format import (
        FORMAT_NAME,
        FORMAT_VERSION,
        MANIFEST,
        index_key,
        progress_name,
        shard_name,
        write_json,
        write_shard,
    )

    hook = "encoder.5.hook_resid_post"
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(64, d_model, generator=g) / 8  # shared low-rank structure (unit variance per dim overall)
    path.mkdir(parents=True)
    config = {
        "model": {"class": "synthetic", "cfg": {"d_model": d_model}, "weights_sample_sha256": None},
        "hooks": {hook: {"axis": "encoder", "shape": [d_model]}},
        "source": {"kind": "synthetic", "n_tokens": n_tokens, "seed": seed},
        "tokenization": {"max_tokens": 512},
        "dtype": "float32",
        "window": 1024,
        "world_size": 1,
    }
    write_json(
        path / MANIFEST, {"format": FORMAT_NAME, "version": FORMAT_VERSION, "output_format": "native", "config": config}
    )
    windows, doc, written, w = [], 0, 0, 0
    while written < n_tokens:
        lengths = torch.randint(40, 161, (1024,), generator=g).tolist()
        lengths = _trim(lengths, n_tokens - written)
        rows = sum(lengths)
        docs = torch.repeat_interleave(torch.arange(doc, doc + len(lengths)), torch.tensor(lengths))
        pos = torch.cat([torch.arange(n, dtype=torch.int32) for n in lengths])
        acts = (torch.randn(rows, d_model, generator=g) + torch.randn(rows, 64, generator=g) @ basis) / 2**0.5
        tensors = {
            hook: acts,
            index_key("encoder", "doc"): docs,
            index_key("encoder", "pos"): pos,
            index_key("encoder", "token_id"): torch.randint(3, 32000, (rows,), generator=g, dtype=torch.int32),
        }
        record = {"window": w, "file": shard_name(0, w), "prompts": len(lengths), "rows": {"encoder": rows}}
        write_shard(path / shard_name(0, w), tensors, record)
        windows.append(record)
        doc, written, w = doc + len(lengths), written + rows, w + 1
    write_json(path / progress_name(0, 1), {"rank": 0, "world_size": 1, "windows": windows, "complete": True})


def _trim(lengths: list[int], budget: int) -> list[int]:
    out, total = [], 0
    for n in lengths:
        if total + n >= budget:
            out.append(budget - total)
            break
        out.append(n)
        total += n
    return [n for n in out if n > 0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t5hooks bench dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[125_000, 250_000, 500_000, 1_000_000])
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--chunk-rows", type=int, default=4096)
    parser.add_argument("--dir", default="/tmp/t5hooks-dashboard-bench")
    args = parser.parse_args(argv)

    from ...interventions import SAE
    from ...viz import feature_dashboard

    sae = SAE(args.d_model, args.d_sae, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(-2.2)
    sae.hook_name = "encoder.5.hook_resid_post"
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    cpu = _cpu_name()
    print(f"# {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        "| tokens | pass s | site s | total s | CPU s (process) | tokens/s (pass) | mean L0 | load avg before -> after |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for n in args.tokens:
        store_dir, out = root / f"store-{n}", root / f"site-{n}"
        write_store(store_dir, n, args.d_model)
        load0 = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        feature_dashboard(store_dir, sae, out, chunk_rows=args.chunk_rows, progress=False)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        load1 = os.getloadavg()[0]
        import json

        info = json.loads((out / "t5hooks-dashboard.json").read_text())
        pass_s = info["pass_seconds"]
        index = json.loads(_embedded(out / "index.html"))
        l0 = sum(f["density"] for f in index["features"])
        print(
            f"| {n:,} | {pass_s:.1f} | {total - pass_s:.1f} | {total:.1f} | {cpu:.1f} | {n / pass_s:,.0f} | {l0:.1f} "
            f"| {load0:.1f} -> {load1:.1f} |",
            flush=True,
        )
        shutil.rmtree(store_dir)
        shutil.rmtree(out)
    return 0


def _embedded(page: Path) -> str:
    import re

    text = page.read_text(encoding="utf-8")
    return re.search(r'<script type="application/json" id="t5hooks-data">(.*?)</script>', text, re.S).group(1)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
