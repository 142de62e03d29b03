"""Whole-model benchmark (`t5hooks bench model`): t5hooks against Hugging Face T5 at t5-small shape.

Rows: HF eager and sdpa forward; our forward (hook points idle, and bypassed to price them),
with all residual streams cached, through the capture module, compiled; on CUDA also with fused
attention; and one training step (LM loss + L1 on every residual stream) eager and compiled.

    t5hooks bench model                  # fp32 on CPU / bf16 on CUDA, batch 8, encoder 128, decoder 32
    t5hooks bench model --quick          # small shapes, few repeats (smoke test)

Prints a table (median wall time over repeats, after warm-up) with the machine and versions.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
import transformers
from transformers import T5Config, T5ForConditionalGeneration

from t5hooks import HookedEncoderDecoder
from t5hooks.dtypes import RUN_DTYPES, cli_dtype
from t5hooks.hook_points import HookPoint
from t5hooks.timing import interleaved_medians

RESID = ["encoder.*.hook_resid_post", "decoder.*.hook_resid_post"]


class bypassed_hook_points:
    """Replace every HookPoint call by a bare return: the cost of hook points with nothing attached."""

    def __enter__(self):
        self.saved = HookPoint.__call__
        HookPoint.__call__ = lambda self, x, io=None: x

    def __exit__(self, *exc):
        HookPoint.__call__ = self.saved


def without_hook_points(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with bypassed_hook_points():
            return fn()

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="t5hooks bench model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        default=None,
        type=cli_dtype(RUN_DTYPES),
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows (slow to compile on CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batch, enc, dec, repeats = (2, 32, 8, 3) if args.quick else (8, 128, 32, 10)
    small = dict(num_layers=2, d_model=128, d_ff=256, num_heads=4, d_kv=32) if args.quick else {}
    cfg = T5Config(dropout_rate=0.0, decoder_start_token_id=0, **small)
    hf = T5ForConditionalGeneration._from_config(cfg, attn_implementation="eager").to(device, dtype).eval()
    hf_sdpa = T5ForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").to(device, dtype).eval()
    hf_sdpa.load_state_dict(hf.state_dict())
    model = HookedEncoderDecoder.from_pretrained(
        "t5-small-shape", hf_model=hf, dtype=dtype, device=device, attn_impl="eager"
    ).eval()
    tokens = torch.randint(3, cfg.vocab_size, (batch, enc), device=device)
    dec_tokens = torch.randint(3, cfg.vocab_size, (batch, dec), device=device)
    compile_s = 0.0

    def compiled(module, *args, **kwargs):
        nonlocal compile_s
        fn = torch.compile(module, fullgraph=True)
        start = time.perf_counter()
        fn(*args, **kwargs)
        compile_s += time.perf_counter() - start
        return fn

    forward: list[tuple[str, Callable[[], object]]] = [
        ("HF eager forward", lambda: hf(input_ids=tokens, decoder_input_ids=dec_tokens)),
        ("HF sdpa forward", lambda: hf_sdpa(input_ids=tokens, decoder_input_ids=dec_tokens)),
        ("t5hooks forward (hook points idle)", lambda: model(tokens, dec_tokens)),
        ("t5hooks forward, hook points bypassed", without_hook_points(lambda: model(tokens, dec_tokens))),
        (
            "t5hooks run_with_cache (all hook_resid_post)",
            lambda: model.run_with_cache(tokens, dec_tokens, names_filter=RESID),
        ),
    ]
    cap_resid = model.capture(RESID)
    forward.append(("capture module, eager (all hook_resid_post)", lambda: cap_resid(tokens, dec_tokens)))
    if device.type == "cuda":
        fused = HookedEncoderDecoder.from_pretrained(
            "t5-small-shape", hf_model=hf, dtype=dtype, device=device, attn_impl="fused"
        ).eval()
        forward.append(("t5hooks forward, fused attention", lambda: fused(tokens, dec_tokens)))
    with torch.inference_mode():
        if not args.no_compile:
            none_fn = compiled(model.capture([]), tokens, dec_tokens)
            resid_fn = compiled(cap_resid, tokens, dec_tokens)
            forward.append(("compiled capture, nothing captured", lambda: none_fn(tokens, dec_tokens)))
            forward.append(("compiled capture (all hook_resid_post)", lambda: resid_fn(tokens, dec_tokens)))
        fwd_ms = interleaved_medians(forward, repeats)

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

    training = [
        ("HF eager training step (LM loss)", hf_step),
        ("t5hooks step (LM loss + L1 on resid_post)", ours_step(model.capture(RESID))),
    ]
    if not args.no_compile:
        train_fn = torch.compile(model.capture(RESID), fullgraph=True)
        start = time.perf_counter()
        ours_step(train_fn)()
        compile_s += time.perf_counter() - start
        training.append(("compiled step (LM loss + L1 on resid_post)", ours_step(train_fn)))
    step_ms = interleaved_medians(training, repeats)
    rows = [(name, ms, "fwd") for name, ms in fwd_ms.items()] + [(name, ms, "step") for name, ms in step_ms.items()]
    ours, bare = fwd_ms["t5hooks forward (hook points idle)"], fwd_ms["t5hooks forward, hook points bypassed"]
    cached = fwd_ms["t5hooks run_with_cache (all hook_resid_post)"]
    baseline = {"fwd": rows[0][1], "step": next(ms for name, ms, _ in rows if name.startswith("HF eager training"))}
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()} CPU, {args.threads} threads"
    )
    print(
        f"\nt5-small shape (d_model {cfg.d_model}, {cfg.num_layers}+{cfg.num_decoder_layers} layers), {str(dtype)[6:]}, "
        f"batch {batch}, encoder {enc}, decoder {dec}; median of {repeats} interleaved runs"
    )
    print(f"{machine}; torch {torch.__version__}, transformers {transformers.__version__}")
    width = max(len(name) for name, _, _ in rows)
    print(f"{'':{width}}  {'ms':>8}  {'vs HF eager':>11}")
    for name, ms, kind in rows:
        print(f"{name:{width}}  {ms:8.2f}  {baseline[kind] / ms:10.2f}x")
    print(
        f"hook points with nothing attached cost {100 * (ours / bare - 1):+.1f}% over bypassed; "
        f"caching all resid_post {100 * (cached / ours - 1):+.1f}%"
    )
    if not args.no_compile:
        print(
            f"compiled capture: all hook_resid_post cost "
            f"{100 * (fwd_ms['compiled capture (all hook_resid_post)'] / fwd_ms['compiled capture, nothing captured'] - 1):+.1f}% "
            f"over capturing nothing (torch.compile took {compile_s:.0f} s in all)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
