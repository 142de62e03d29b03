"""ONNX Runtime on CPU at t5-small shape: forward and greedy generation against torch eager (t5hooks)
and Hugging Face eager T5.

Shape: `transformers.T5Config()` defaults (6+6 layers, d_model 512, 8 heads, vocab 32128), random
weights, fp32. Forward: batch 8, encoder 128, decoder 32. Generation: the same inputs, 32 new
tokens, greedy (`do_sample=False, num_beams=1`), EOS not reached within 32 tokens (checked).
All three share one set of weights; the script checks that their logits and tokens agree before
timing. Threads: torch and ONNX Runtime both get `--threads` intra-op threads (default 2).

    python benchmarks/onnx_cpu.py [--threads 2] [--repeats 6] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from transformers import T5Config, T5ForConditionalGeneration

from t5hooks import HookedEncoderDecoder
from t5hooks.export import OnnxGenerator, OnnxRunner, to_onnx
from t5hooks.export.ort import session_options

BATCH, ENC, DEC, NEW_TOKENS = 8, 128, 32, 32
LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def timed(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time (seconds) of each candidate after one warm-up run each. Runs are interleaved
    (A, B, C, A, B, C, ...) so that load from other processes falls on all candidates alike."""
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def options(threads: int, level: str) -> ort.SessionOptions:
    """The runner's default session options (see `t5hooks.export.ort.session_options`) at another
    graph-optimisation level."""
    opts = session_options(threads)
    opts.graph_optimization_level = LEVELS[level]
    return opts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and ORT (default: 2)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=6,
        help="timed forward runs per row (median; generation runs half as many; default: 6)",
    )
    parser.add_argument("--workdir", default=None, help="where to write the ONNX files (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="t5hooks-onnx-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    # T5Config() defaults are t5-small's shape; t5-small's config.json also sets the decoder start token (0)
    hf = T5ForConditionalGeneration._from_config(T5Config(decoder_start_token_id=0), attn_implementation="eager").eval()
    ours = HookedEncoderDecoder.from_pretrained("t5-small-random", hf_model=hf).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, hf.config.vocab_size, (BATCH, ENC), generator=g)
    mask = torch.ones(BATCH, ENC, dtype=torch.long)
    for row in range(BATCH):  # a realistic padded batch: rows of 128 down to 72 tokens
        mask[row, ENC - 8 * row :] = 0
        tokens[row, ENC - 8 * row :] = 0
    dec = torch.randint(2, hf.config.vocab_size, (BATCH, DEC), generator=g)
    dec[:, 0] = hf.config.decoder_start_token_id

    print("exporting ...", flush=True)
    start = time.perf_counter()
    forward_path = to_onnx(ours, workdir / "t5_small.onnx")
    forward_export_s = time.perf_counter() - start
    start = time.perf_counter()
    OnnxGenerator.export(ours, workdir / "t5_small_generator")
    generator_export_s = time.perf_counter() - start

    runners = {
        level: OnnxRunner(forward_path, ["CPUExecutionProvider"], options=options(args.threads, level))
        for level in LEVELS
    }
    generator = OnnxGenerator(workdir / "t5_small_generator", ["CPUExecutionProvider"], threads=args.threads)

    tok_np, mask_np, dec_np = tokens.numpy(), mask.numpy(), dec.numpy()
    with torch.inference_mode():
        hf_logits = hf(input_ids=tokens, attention_mask=mask, decoder_input_ids=dec).logits
        our_logits = ours(tokens, dec, one_zero_attention_mask=mask)
        hf_tokens = hf.generate(
            input_ids=tokens, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1
        )
        our_tokens = ours.generate(tokens, NEW_TOKENS, one_zero_attention_mask=mask)
    ort_logits = runners["all"](tok_np, dec_np, mask_np)["logits"]
    ort_tokens = generator.generate(tok_np, NEW_TOKENS, one_zero_attention_mask=mask_np).tokens
    checks = {
        "ours vs HF logits max |diff|": float((our_logits - hf_logits).abs().max()),
        "ORT vs HF logits max |diff|": float(np.abs(ort_logits - hf_logits.numpy()).max()),
    }
    if not (
        hf_tokens.shape == (BATCH, NEW_TOKENS + 1)
        and torch.equal(hf_tokens, our_tokens)
        and np.array_equal(ort_tokens, hf_tokens.numpy())
    ):
        print(
            f"generation disagrees or stopped early: HF {tuple(hf_tokens.shape)}, ours {tuple(our_tokens.shape)}, "
            f"ORT {ort_tokens.shape}",
            file=sys.stderr,
        )
        return 1
    if max(checks.values()) > 1e-3:
        print(f"logits disagree: {checks}", file=sys.stderr)
        return 1

    load_before = os.getloadavg()
    with torch.inference_mode():
        forward = {
            "HF eager": lambda: hf(input_ids=tokens, attention_mask=mask, decoder_input_ids=dec),
            "t5hooks eager": lambda: ours(tokens, dec, one_zero_attention_mask=mask),
            **{f"ORT ({level})": (lambda r=runner: r(tok_np, dec_np, mask_np)) for level, runner in runners.items()},
        }
        generate = {
            "HF eager": lambda: hf.generate(
                input_ids=tokens, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1
            ),
            "t5hooks eager": lambda: ours.generate(tokens, NEW_TOKENS, one_zero_attention_mask=mask),
            "ORT (all)": lambda: generator.generate(tok_np, NEW_TOKENS, one_zero_attention_mask=mask_np),
        }
        results = {"forward": timed(forward, args.repeats), "generate": timed(generate, max(1, args.repeats // 2))}
    load_after = os.getloadavg()

    print()
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}")
    print(
        f"versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, onnxruntime {ort.__version__}, onnx {onnx.__version__}"
    )
    print(
        f"threads: torch {torch.get_num_threads()}, ORT intra-op {args.threads}; ORT session options: the runner's "
        f"defaults (session.dynamic_block_base=4), graph optimisation level per row"
    )
    print(f"load average before/after timing: {load_before[0]:.2f} / {load_after[0]:.2f} (1 min)")
    print(
        f"model: T5Config() defaults (t5-small shape), random weights, fp32; batch {BATCH}, encoder {ENC} "
        f"(padded rows), decoder {DEC}; generation {NEW_TOKENS} new tokens, greedy"
    )
    print(
        f"export: forward graph {forward_export_s:.1f} s, generator graphs {generator_export_s:.1f} s; "
        + ", ".join(f"{k} {v:.1e}" for k, v in checks.items())
        + "; greedy tokens identical in all three"
    )
    print()
    print(f"{'':10} {'runtime':16} {'median':>10} {'vs HF eager':>12} {'vs t5hooks eager':>17}")
    for task, rows in results.items():
        hf_time, our_time = rows["HF eager"], rows["t5hooks eager"]
        for name, seconds in rows.items():
            print(f"{task:10} {name:16} {seconds * 1e3:8.1f} ms {hf_time / seconds:11.2f}x {our_time / seconds:16.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
