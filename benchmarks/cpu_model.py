"""CPU benchmark at t5-small shape: our eager forward, hook overhead, caching, compiled capture and a
training step, each against Hugging Face's eager T5.

    python benchmarks/cpu_model.py            # fp32, batch 8, encoder 128, decoder 32
    python benchmarks/cpu_model.py --quick    # smaller shapes, fewer repeats (smoke test)

Prints a table (median wall time over repeats, after warm-up) with the machine and versions.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import transformers
from transformers import T5Config, T5ForConditionalGeneration

from t5hooks import HookedEncoderDecoder
from t5hooks.hook_points import HookPoint

RESID = ["encoder.*.hook_resid_post", "decoder.*.hook_resid_post"]


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


class bypassed_hook_points:
    """Replace every HookPoint call by a bare return: the cost of hook points with nothing attached."""

    def __enter__(self):
        self.saved = HookPoint.__call__
        HookPoint.__call__ = lambda self, x, io=None: x

    def __exit__(self, *exc):
        HookPoint.__call__ = self.saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows (slow to compile on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, enc, dec, repeats = (2, 32, 8, 3) if args.quick else (8, 128, 32, 10)
    small = dict(num_layers=2, d_model=128, d_ff=256, num_heads=4, d_kv=32) if args.quick else {}
    cfg = T5Config(dropout_rate=0.0, decoder_start_token_id=0, **small)
    hf = T5ForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    model = HookedEncoderDecoder.from_pretrained("t5-small-shape", hf_model=hf).eval()
    tokens = torch.randint(3, cfg.vocab_size, (batch, enc))
    dec_tokens = torch.randint(3, cfg.vocab_size, (batch, dec))
    rows: list[tuple[str, float]] = []

    with torch.inference_mode():
        hf_fwd = median_ms(lambda: hf(input_ids=tokens, decoder_input_ids=dec_tokens), repeats)
        rows.append(("HF eager forward", hf_fwd))
        ours = median_ms(lambda: model(tokens, dec_tokens), repeats)
        rows.append(("t5hooks eager forward (hook points, none attached)", ours))
        with bypassed_hook_points():
            bare = median_ms(lambda: model(tokens, dec_tokens), repeats)
        rows.append(("t5hooks eager forward, hook points bypassed", bare))
        cached = median_ms(lambda: model.run_with_cache(tokens, dec_tokens, names_filter=RESID), repeats)
        rows.append(("t5hooks run_with_cache (all hook_resid_post)", cached))
        cap_none, cap_resid = model.capture([]), model.capture(RESID)
        rows.append(("t5hooks capture module, eager (all hook_resid_post)", median_ms(lambda: cap_resid(tokens, dec_tokens), repeats)))
        if not args.no_compile:
            compiled_none = torch.compile(cap_none, fullgraph=True)
            compiled_resid = torch.compile(cap_resid, fullgraph=True)
            start = time.perf_counter()
            compiled_none(tokens, dec_tokens)
            compiled_resid(tokens, dec_tokens)
            compile_s = time.perf_counter() - start
            rows.append(("compiled capture, nothing captured", median_ms(lambda: compiled_none(tokens, dec_tokens), repeats)))
            rows.append(("compiled capture (all hook_resid_post)", median_ms(lambda: compiled_resid(tokens, dec_tokens), repeats)))

    labels = dec_tokens

    def hf_step():
        hf.zero_grad(set_to_none=True)
        hf(input_ids=tokens, labels=labels).loss.backward()

    def ours_step(cap):
        def step():
            model.zero_grad(set_to_none=True)
            out = cap(tokens, labels=labels)
            (out["loss"] + 1e-3 * sum(out[n].abs().mean() for n in out if n.endswith("resid_post"))).backward()
        return step

    rows.append(("HF eager training step (fwd+bwd, LM loss)", median_ms(hf_step, repeats)))
    rows.append(("t5hooks eager step (LM loss + L1 on resid_post)", median_ms(ours_step(model.capture(RESID)), repeats)))
    if not args.no_compile:
        train_cap = torch.compile(model.capture(RESID), fullgraph=True)
        start = time.perf_counter()
        ours_step(train_cap)()
        compile_s += time.perf_counter() - start
        rows.append(("compiled step (LM loss + L1 on resid_post)", median_ms(ours_step(train_cap), repeats)))

    print(f"\nt5-small shape (d_model {cfg.d_model}, {cfg.num_layers}+{cfg.num_decoder_layers} layers), fp32, "
          f"batch {batch}, encoder {enc}, decoder {dec}; median of {repeats}")
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    width = max(len(name) for name, _ in rows)
    print(f"{'':{width}}  {'ms':>8}  {'vs HF':>6}")
    for name, ms in rows:
        ref = hf_fwd if "step" not in name else rows[[n for n, _ in rows].index("HF eager training step (fwd+bwd, LM loss)")][1]
        print(f"{name:{width}}  {ms:8.1f}  {ref / ms:5.2f}x")
    print(f"hook points with nothing attached: {100 * (ours / bare - 1):+.1f}% over bypassed; "
          f"caching all resid_post: {100 * (cached / ours - 1):+.1f}%")
    if not args.no_compile:
        print(f"(torch.compile took {compile_s:.0f} s in all)")


if __name__ == "__main__":
    main()
