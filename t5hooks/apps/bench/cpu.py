"""CPU benchmark (`t5hooks bench cpu`, or `python benchmarks/cpu.py`): every CPU fast path against HF eager.

Shape: t5-small (6+6 layers, d_model 512, d_ff 2048, 8 heads) as a T5 v1.1-style model (gated GELU,
untied head) built from `transformers.T5Config` with random weights, fp32; batch 8, encoder 128
(padded rows of 128 down to 72 tokens), decoder 32. Prints, in one process:

* the machine (CPU model, the SIMD/AMX flags that decide which kernels run, cores, load average)
  and versions (torch with MKL/oneDNN, numpy with its BLAS, onnxruntime, transformers);
* the achieved GFLOP/s of the MLP input projection's GEMM ([B*E x 512] @ [512 x 2048], prefill; and
  [B x 512] @ [512 x 2048], one decode step) in torch's default (MKL), oneDNN on the weight as it is and
  prepacked, torch under inductor freezing / max-autotune, bf16, NumPy (its BLAS) and ONNX Runtime (MLAS),
  so "GEMM-bound at the limit" is a measured claim; and forward+backward of the same GEMM (MKL vs oneDNN);
* which kernel the CPU GEMM backend's `auto` chose for every weight shape of the model in each shape
  class (kernels/cpu_gemm.py), with its micro-benchmark's timings and what measuring cost;
* forward rows, interleaved (A, B, C, A, B, C, ...) so the load of other processes falls on every
  row alike: HF eager / sdpa, t5hooks eager with each CPU GEMM setting (`mkl` is torch's default, what
  t5hooks ran before the backend existed), materialised attention, caching every `hook_resid_post`, the
  compiled capture module (all `hook_resid_post`) with each lever as its own row, ONNX Runtime with each
  lever as its own row; median ms, ratio to HF eager, the model's effective GFLOP/s, and max |logits - HF
  eager logits| (bf16 and int8 rows show their error);
* a training step (forward + backward of the loss) of HF, t5hooks eager and the compiled capture module, the
  latter two with torch's default GEMMs (what `auto` runs under autograd) and with oneDNN;
* greedy generation rows (HF `generate`, t5hooks `generate` per setting, the ONNX Runtime generator), the
  same tokens asserted;
* extraction rows: `t5hooks extract` (eager and compiled, per setting) against HF + forward hooks, real
  tokens/s over a seeded corpus of log-normal lengths, every encoder `hook_resid_post` stored.

    t5hooks bench cpu                      # everything (compiling takes minutes on 2 cores)
    t5hooks bench cpu --skip max-autotune  # leave out rows whose name contains a word (gemm-autotune: the
                                           # max-autotune GEMM row; generate; extract; training; compiled;
                                           # ORT; freezing; bf16 ...)
    t5hooks bench cpu --quick              # tiny shapes, few repeats (smoke test)

and last, the compile section (`t5hooks bench compiling`; leave it out with `--skip compile-cost`): the capture
training step and forward, eager against regional and whole-graph compilation, with cold and warm compile
times, recompiles over a run of batch shapes and steady-state speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...timing import time_rows

RESID = ["encoder.*.hook_resid_post", "decoder.*.hook_resid_post"]
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


# ---- machine and versions ---------------------------------------------------------------------


def cpu_info() -> dict[str, Any]:
    """Model name, the flags in FLAGS that are present, logical cores, MHz (from /proc/cpuinfo)."""
    info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "flags": [], "mhz": None}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name":
            info["model"] = value
        elif key == "flags" and not info["flags"]:
            present = set(value.split())
            info["flags"] = [f for f in FLAGS if f in present]
        elif key == "cpu MHz" and info["mhz"] is None:
            info["mhz"] = float(value)
    info["cores"] = os.cpu_count()
    return info


def has_native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_info()["flags"]))


def versions() -> str:
    import onnxruntime as ort
    import transformers

    blas = "?"
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{deps.get('name', '?')} {deps.get('version', '')}".strip()
    except (KeyError, TypeError, ValueError, AttributeError):  # numpy builds differ: the line then shows "?"
        pass
    config = torch.__config__.show()
    mkldnn = next((line.split(" v", 1)[1].split()[0] for line in config.splitlines() if "MKL-DNN v" in line), "?")
    return (
        f"python {platform.python_version()}, torch {torch.__version__} (MKL {torch.backends.mkl.is_available()}, "
        f"oneDNN {mkldnn}, CPU capability {torch.backends.cpu.get_cpu_capability()}), numpy {np.__version__} "
        f"({blas}), onnxruntime {ort.__version__}, transformers {transformers.__version__}"
    )


# ---- timing ------------------------------------------------------------------------------------


def interleaved(rows: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per row, rows timed round-robin with a settle gap between calls (`timing.time_rows`)."""
    return {name: t.median_ms / 1e3 for name, t in time_rows(list(rows.items()), repeats, warmup).items()}


# ---- GEMM ceiling ------------------------------------------------------------------------------


def gemm_rows(
    m: int, k: int, n: int, threads: int, skip: Callable[[str], bool], inductor: bool = True
) -> dict[str, Callable[[], object]]:
    """`[m,k] @ [k,n]` in each library the model can run on (`inductor`: with the compiled rows)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ...kernels import cpu_gemm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5  # nn.Linear layout
    rows: dict[str, Callable[[], object]] = {}
    linear_pointwise = torch.ops.mkldnn._linear_pointwise
    with torch.no_grad():
        rows["torch fp32 F.linear (MKL: torch's default)"] = lambda: torch.nn.functional.linear(x, w)
        rows["torch fp32 oneDNN (weight as it is)"] = lambda: linear_pointwise(x, w, None, "none", [], "")
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        rows["torch fp32 oneDNN (prepacked weight)"] = lambda: linear_pointwise(x, packed, None, "none", [], "")
        if inductor and not skip("freezing"):
            frozen = torch.compile(lin_for(w), options={"freezing": True, "cpp.weight_prepack": True})
            rows["torch fp32 inductor freezing (MKL prepacked on x86)"] = no_grad(frozen, x)
        if inductor and not skip("gemm-autotune"):
            tuned = torch.compile(lin_for(w), options={"freezing": True, "max_autotune": True})
            try:
                rows["torch fp32 (inductor max-autotune GEMM template)"] = no_grad(tuned, x)
            except Exception as err:  # noqa: BLE001 - reported, not fatal
                print(f"max-autotune GEMM failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        if not skip("bf16"):
            param = torch.nn.Parameter(w.clone())
            native = "native" if cpu_gemm.native_bf16() else "EMULATED: no native bf16 on this CPU"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the emulation warning: said in the row name
                cpu_gemm.linear(x, param, "bf16")
            rows[f"torch bf16 (cpu_gemm='bf16', {native})"] = lambda: cpu_gemm.linear(x, param, "bf16")
    xn, wtn = x.numpy(), np.ascontiguousarray(w.numpy().T)
    rows["numpy fp32 (matmul, its BLAS)"] = lambda: xn @ wtn
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(wtn, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rows["onnxruntime fp32 (MatMul, MLAS)"] = lambda: session.run(None, {"x": xn})
    del onnx
    return rows


def training_gemm_rows(m: int, k: int, n: int) -> dict[str, Callable[[], object]]:
    """Forward + backward of `[m,k] @ [k,n]` (y, dx, dw) with torch's default and with oneDNN: does the backend
    pay for training too? (the transposes oneDNN's linear needs for dx and dw are counted)"""
    g = torch.Generator().manual_seed(0)
    x, w, dy = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(m, n, generator=g)

    def onednn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")

    def mkl() -> object:
        return torch.nn.functional.linear(x, w), dy @ w, dy.t() @ x

    def dnn() -> object:
        return onednn(x, w), onednn(dy, w.t().contiguous()), onednn(dy.t().contiguous(), x.t().contiguous())

    return {"fwd+bwd, torch's default (MKL)": mkl, "fwd+bwd, oneDNN (with transposes)": dnn}


def no_grad(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> Callable[[], object]:
    """`fn(x)` under no_grad (freezing applies only there), called once now: compiling is not timed."""

    def run() -> object:
        with torch.no_grad():
            return fn(x)

    run()
    return run


def lin_for(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    return lin.eval()


# ---- model ---------------------------------------------------------------------------------------


def forward_flops(cfg: Any, batch: int, enc: int, dec: int) -> float:
    """Multiply-adds x 2 of every matmul of one forward (projections, attention, MLP, unembedding)."""
    d, inner, ff, vocab = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.vocab_size
    mlp_mats = 3 if cfg.is_gated_act else 2
    enc_tokens, dec_tokens = batch * enc, batch * dec
    encoder = cfg.num_layers * (enc_tokens * (4 * d * inner + mlp_mats * d * ff) + 2 * batch * enc * enc * inner)
    decoder = cfg.num_decoder_layers * (
        dec_tokens * (4 * d * inner + 2 * d * inner + mlp_mats * d * ff)  # self q,k,v,o + cross q,o
        + enc_tokens * 2 * d * inner  # cross k,v over the encoder output
        + 2 * batch * dec * dec * inner
        + 2 * batch * dec * enc * inner
    )
    return 2.0 * (encoder + decoder + dec_tokens * d * vocab)


def build(quick: bool) -> tuple[Any, Any, tuple[int, int, int]]:
    from transformers import T5Config, T5ForConditionalGeneration

    small = dict(num_layers=2, d_model=64, d_ff=128, num_heads=4, d_kv=16, vocab_size=256) if quick else {}
    cfg = T5Config(
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0, **small
    )
    torch.manual_seed(0)
    hf = T5ForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # transformers ties lm_head at init: give it its own weights (v1.1 is untied)
        hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight) * cfg.d_model**-0.5)
    return hf, cfg, ((2, 24, 8) if quick else (8, 128, 32))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="t5hooks bench cpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (a smoke test)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and ORT threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per forward row (default 8)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens in the generation rows")
    parser.add_argument("--skip", nargs="*", default=[], metavar="WORD", help="leave out rows naming WORD")
    parser.add_argument("--workdir", default=None, help="where to write the ONNX files (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    skip_words = [w.lower() for w in args.skip]

    def skip(name: str) -> bool:
        return any(w in name.lower() for w in skip_words)

    repeats = args.repeats or (2 if args.quick else 8)
    from transformers import T5ForConditionalGeneration

    from ...capture import compile_capture
    from ...export import OnnxRunner, to_onnx
    from ...export.ort import session_options
    from ...kernels import cpu_gemm
    from ...model import HookedEncoderDecoder

    hf, cfg, (batch, enc, dec) = build(args.quick)
    hf_sdpa = T5ForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    hf_sdpa.lm_head.weight = torch.nn.Parameter(torch.empty_like(hf_sdpa.lm_head.weight))  # untie, as in `build`
    hf_sdpa.load_state_dict(hf.state_dict())
    ours = HookedEncoderDecoder.from_pretrained("t5-small-shape", hf_model=hf).eval()  # attn_impl auto: SDPA on CPU
    materialised = HookedEncoderDecoder.from_pretrained("t5-small-shape", hf_model=hf, attn_impl="eager").eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, cfg.vocab_size, (batch, enc), generator=g)
    mask = torch.ones(batch, enc, dtype=torch.long)
    for row in range(batch):  # a realistic padded batch: rows of enc down to enc - 7 * enc / 16 tokens
        cut = enc - row * enc // 16
        mask[row, cut:] = 0
        tokens[row, cut:] = 0
    dec_tokens = torch.randint(2, cfg.vocab_size, (batch, dec), generator=g)
    dec_tokens[:, 0] = cfg.decoder_start_token_id
    tok_np, mask_np, dec_np = tokens.numpy(), mask.numpy(), dec_tokens.numpy()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="t5hooks-bench-cpu-"))
    workdir.mkdir(parents=True, exist_ok=True)

    cpu = cpu_info()
    print(f"machine: {cpu['model']}, {cpu['cores']} logical cores, {cpu['mhz'] or '?'} MHz listed")
    print(f"flags: {' '.join(cpu['flags']) or 'none of ' + ' '.join(FLAGS)}")
    print(f"versions: {versions()}")
    print(f"threads: torch {torch.get_num_threads()}, ORT intra-op {args.threads}")
    print(f"load average at start: {' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1 / 5 / 15 min)", flush=True)

    # ---- GEMM ceiling
    k, n = cfg.d_model, cfg.d_ff
    for label, m in (("prefill", batch * enc), ("decode step", batch)):
        rows_m = gemm_rows(m, k, n, args.threads, skip, inductor=label == "prefill")
        gemm = interleaved(rows_m, repeats=max(5, 3 * repeats))
        print(f"\nGEMM [{m}x{k}] @ [{k}x{n}] (the MLP input projection, {label}), median of interleaved runs:")
        for name, seconds in gemm.items():
            print(f"  {name:56} {2 * m * k * n / seconds / 1e9:7.1f} GFLOP/s  ({seconds * 1e3:.3f} ms)")
    if not skip("training"):
        m = batch * enc
        gemm = interleaved(training_gemm_rows(m, k, n), repeats=max(5, 3 * repeats))
        print(f"\nGEMM training [{m}x{k}] @ [{k}x{n}]: forward y, backward dx and dw (3 GEMMs), median:")
        for name, seconds in gemm.items():
            print(f"  {name:56} {6 * m * k * n / seconds / 1e9:7.1f} GFLOP/s  ({seconds * 1e3:.3f} ms)")
    report_auto_choices(cfg)

    # ---- forward rows
    compile_s: dict[str, float] = {}

    def compiled_row(name: str, model: Any, **levers: Any) -> Callable[[], Any]:
        fn = compile_capture(model.capture(RESID), **levers)
        start = time.perf_counter()
        fn(tokens, dec_tokens, mask)
        compile_s[name] = time.perf_counter() - start
        return lambda: fn(tokens, dec_tokens, mask)

    def onnx_row(name: str, file: Path, **runner_options: Any) -> Callable[[], Any]:
        runner = OnnxRunner(file, ["CPUExecutionProvider"], **runner_options)
        return lambda: runner(tok_np, dec_np, mask_np)

    def eager_row(model: Any, setting: str | None, **run_with_cache: Any) -> Callable[[], Any]:
        def run() -> Any:
            with cpu_gemm.use(setting):
                if run_with_cache:
                    return model.run_with_cache(tokens, dec_tokens, one_zero_attention_mask=mask, **run_with_cache)[0]
                return model(tokens, dec_tokens, one_zero_attention_mask=mask)

        return run

    rows: dict[str, Callable[[], Any]] = {
        "HF eager": lambda: hf(input_ids=tokens, attention_mask=mask, decoder_input_ids=dec_tokens).logits,
        "HF sdpa": lambda: hf_sdpa(input_ids=tokens, attention_mask=mask, decoder_input_ids=dec_tokens).logits,
        "t5hooks eager, cpu_gemm=mkl (torch's default GEMMs)": eager_row(ours, "mkl"),
        "t5hooks eager, cpu_gemm=onednn": eager_row(ours, "onednn"),
        "t5hooks eager (cpu_gemm auto: the default)": eager_row(ours, None),
        "t5hooks eager, materialised attention (auto)": eager_row(materialised, None),
        "t5hooks eager + cache all resid_post (auto)": eager_row(ours, None, names_filter=RESID),
    }
    if cpu_gemm.native_bf16():
        rows["t5hooks eager, cpu_gemm=bf16 (opt-in)"] = eager_row(ours, "bf16")
    levers = {
        "compiled capture, cpu_gemm=mkl": (ours, {"cpu_gemm": "mkl"}),
        "compiled capture (auto)": (ours, {}),
        "compiled capture, materialised attention (auto)": (materialised, {}),
        "compiled + freezing, cpu_gemm=mkl (MKL prepack)": (ours, {"freeze": True, "cpu_gemm": "mkl"}),
        "compiled + freezing (auto)": (ours, {"freeze": True}),
        "compiled + freezing + max-autotune, cpu_gemm=mkl": (
            ours,
            {"freeze": True, "max_autotune": True, "cpu_gemm": "mkl"},
        ),
    }
    if has_native_bf16():
        levers["compiled + freezing + bf16 autocast"] = (ours, {"freeze": True, "bf16": True})
    with torch.inference_mode():
        for name, (model, options) in levers.items():
            if skip(name):
                continue
            print(f"compiling: {name} ...", flush=True)
            try:
                rows[name] = compiled_row(name, model, **options)
            except Exception as err:  # noqa: BLE001 - a lever that does not compile here is reported, not fatal
                print(f"  failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)

    export_s: dict[str, float] = {}
    exported: dict[str, Path] = {}
    if not skip("ORT"):
        from ...export.ort_optimize import optimize_onnx, quantize_onnx

        print("exporting: ORT ...", flush=True)
        start = time.perf_counter()
        exported["ORT"] = to_onnx(ours, workdir / "t5_fp32.onnx", capture=RESID)
        export_s["ORT"] = time.perf_counter() - start
        rewrites = {
            "ORT, transformer optimiser": ("t5_opt.onnx", optimize_onnx),
            "ORT int8 dynamic (opt-in)": ("t5_int8.onnx", quantize_onnx),
        }
        for name, (file, rewrite) in rewrites.items():
            if not skip(name):
                start = time.perf_counter()
                exported[name] = rewrite(exported["ORT"], workdir / file)  # what to_onnx(optimize/quantize=) runs
                export_s[name] = time.perf_counter() - start
    if "ORT" in exported:
        for level in ("basic", "extended", "all"):
            name = f"ORT fp32, {level} graph optimisations"
            if not skip(name):
                rows[name] = onnx_row(name, exported["ORT"], options=session_options(args.threads, level=level))
        name = "ORT fp32, all, no thread spinning"
        if not skip(name):
            rows[name] = onnx_row(name, exported["ORT"], options=session_options(args.threads, spinning=False))
    for name in ("ORT, transformer optimiser", "ORT int8 dynamic (opt-in)"):
        if name in exported:
            rows[name] = onnx_row(name, exported[name], options=session_options(args.threads))

    with torch.inference_mode():
        reference = hf(input_ids=tokens, attention_mask=mask, decoder_input_ids=dec_tokens).logits.float().numpy()
        errors = {}
        for name, fn in rows.items():
            out = fn()
            logits = out["logits"] if isinstance(out, dict) else out
            logits = logits.float().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
            errors[name] = float(np.abs(logits - reference).max())
        load_before = os.getloadavg()[0]
        print(f"timing {len(rows)} forward rows x {repeats} interleaved runs ...", flush=True)
        forward = interleaved(rows, repeats)
        load_after = os.getloadavg()[0]

    flops = forward_flops(cfg, batch, enc, dec)
    print(
        f"\nforward: t5-small shape, T5 v1.1-style (gated GELU, untied), random weights, fp32; batch {batch}, "
        f"encoder {enc} (padded rows), decoder {dec}; compiled and ORT rows capture all {2 * cfg.num_layers} "
        f"hook_resid_post; {flops / 1e9:.1f} GFLOP per forward; median of {repeats} interleaved runs; "
        f"load average {load_before:.1f} -> {load_after:.1f}"
    )
    base = forward["HF eager"]
    width = max(map(len, forward))
    print(f"{'':{width}}  {'ms':>8}  {'vs HF eager':>11}  {'GFLOP/s':>8}  {'max |dlogits|':>13}")
    for name, seconds in forward.items():
        print(
            f"{name:{width}}  {seconds * 1e3:8.1f}  {base / seconds:10.2f}x  {flops / seconds / 1e9:8.1f}  "
            f"{errors[name]:13.1e}"
        )
    if compile_s:
        print("compile time (first call): " + ", ".join(f"{k} {v:.0f} s" for k, v in compile_s.items()))
    if export_s:
        print("export / rewrite time: " + ", ".join(f"{k} {v:.0f} s" for k, v in export_s.items()))

    # ---- training, generation, extraction
    if not skip("training"):
        training_rows(hf, ours, tokens, mask, dec_tokens, repeats, skip)
    if not skip("generate"):
        generation_rows(args, hf, ours, tokens, mask, workdir, skip)
    if not skip("extract"):
        extract_rows(args, hf, workdir, skip)
    print(f"\nload average at the end: {' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1 / 5 / 15 min)")

    # ---- what compiling costs and buys (bench/compiling.py: cold / warm compile, recompiles, step vs eager);
    # it measures in fresh processes of its own, so it runs as one
    if not skip("compile-cost"):
        argv = ["--repeats", str(max(3, repeats // 2)), "--threads", str(args.threads)]
        argv += (["--quick"] if args.quick else []) + (["--skip", "whole"] if skip("whole") else [])
        subprocess.run([sys.executable, "-m", "t5hooks.apps.bench.compiling", *argv], check=True)
    return 0


def report_auto_choices(cfg: Any) -> None:
    """What `auto` picks for every weight shape of the model in each shape class, measured now (the one-off
    micro-benchmark a process runs at first use), with each kernel's best time relative to torch's default."""
    from ...kernels import cpu_gemm

    inner = cfg.num_heads * cfg.d_kv
    shapes: dict[tuple[int, int], str] = {}  # [N, K] of every linear layer -> which layers have it
    for shape, layer in (
        ((inner, cfg.d_model), "q/k/v"),
        ((cfg.d_model, inner), "o"),
        ((cfg.d_ff, cfg.d_model), "MLP in/gate"),
        ((cfg.d_model, cfg.d_ff), "MLP out"),
        ((cfg.vocab_size, cfg.d_model), "unembed"),
    ):
        shapes[shape] = f"{shapes[shape]}/{layer}" if shape in shapes else layer
    start = time.perf_counter()
    picked = {
        (c, n, k): cpu_gemm.choose(c, k, n) for c in cpu_gemm.SHAPE_CLASSES for (n, k) in shapes
    }  # measured here, before any row runs
    cost = time.perf_counter() - start
    timings = cpu_gemm.timings()
    print(
        f"\nCPU GEMM backend, auto's choice per shape class and weight [N,K] (decode: <= {cpu_gemm.DECODE_MAX_ROWS} "
        f"rows; micro-benchmark at {cpu_gemm.BENCH_ROWS} rows, best of {cpu_gemm.BENCH_ROUNDS}; speed vs MKL):"
    )
    for (c, n, k), kernel in picked.items():
        best = timings.get(f"{c} [{n},{k}] threads={torch.get_num_threads()}")
        speed = (
            "  ".join(f"{name} {best['mkl'] / t:4.2f}x" for name, t in best.items())
            if best
            else "(from the disk cache)"
        )
        print(f"  {c:8} [{n:>6},{k:>5}] {shapes[(n, k)]:12} -> {kernel:14} {speed}")
    print(f"  measuring took {cost * 1e3:.0f} ms in all (once per process; T5HOOKS_CPU_GEMM_CACHE keeps it on disk)")


def training_rows(hf: Any, ours: Any, tokens: Any, mask: Any, dec_tokens: Any, repeats: int, skip: Any) -> None:
    """One training step's forward + backward of the loss (teacher-forced on `dec_tokens`): HF eager, t5hooks
    eager and the compiled capture module, each with torch's default GEMMs (`cpu_gemm=mkl`, what `auto` runs
    under autograd) and with `cpu_gemm=onednn` (the forward's GEMMs by oneDNN, the backward by torch's matmuls)."""
    from ...capture import compile_capture
    from ...kernels import cpu_gemm

    labels = dec_tokens.clone()
    hf.train()  # dropout is 0: the same function, with autograd
    ours.train()

    def hf_step() -> Any:
        hf.zero_grad(set_to_none=True)
        loss = hf(input_ids=tokens, attention_mask=mask, decoder_input_ids=dec_tokens, labels=labels).loss
        loss.backward()
        return loss

    def eager_step(setting: str | None) -> Callable[[], Any]:
        def step() -> Any:
            ours.zero_grad(set_to_none=True)
            with cpu_gemm.use(setting):
                loss = ours(tokens, dec_tokens, return_type="loss", one_zero_attention_mask=mask, labels=labels)
            loss.backward()
            return loss

        return step

    def compiled_step(setting: str | None) -> Callable[[], Any]:
        compiled = compile_capture(ours.capture(RESID), cpu_gemm=setting)  # no freezing: weights train

        def step() -> Any:
            ours.zero_grad(set_to_none=True)
            loss = compiled(tokens, dec_tokens, mask, labels=labels)["loss"]
            loss.backward()
            return loss

        print(f"compiling: the training step, cpu_gemm={setting or 'auto'} ...", flush=True)
        start = time.perf_counter()
        step()
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
        return step

    rows: dict[str, Callable[[], Any]] = {
        "HF eager train step": hf_step,
        "t5hooks eager train step, cpu_gemm=mkl": eager_step("mkl"),
        "t5hooks eager train step (auto: MKL under autograd)": eager_step(None),
        "t5hooks eager train step, cpu_gemm=onednn": eager_step("onednn"),
    }
    if not skip("compiled capture train"):
        rows["compiled capture train step, cpu_gemm=mkl"] = compiled_step("mkl")
        rows["compiled capture train step, cpu_gemm=onednn"] = compiled_step("onednn")
    losses = {name: float(fn().detach()) for name, fn in rows.items()}
    times = interleaved(rows, max(1, repeats // 2))
    hf.eval()
    ours.eval()
    base = times["HF eager train step"]
    print(
        f"\ntraining step (forward + backward of the loss; compiled rows return all resid_post too), median of "
        f"{max(1, repeats // 2)} interleaved runs:"
    )
    width = max(map(len, times))
    for name, seconds in times.items():
        print(f"{name:{width}}  {seconds * 1e3:8.1f} ms  {base / seconds:6.2f}x  loss {losses[name]:.6f}")


def extract_rows(args: Any, hf: Any, workdir: Path, skip: Any) -> None:
    """`t5hooks extract` of every encoder `hook_resid_post` over a seeded corpus (byte tokens), eager and
    compiled, per CPU GEMM setting, against HF + forward hooks (bench extract's hand-rolled loop); real tokens/s."""
    import shutil

    from ...kernels import cpu_gemm
    from ...model import HookedEncoderDecoder
    from ...store import extract
    from ...tokenizer import ByteTokenizer
    from .extract import HOOKS, hand_rolled, seeded_corpus

    tokenizer = ByteTokenizer()
    model = HookedEncoderDecoder.from_pretrained("t5-small-shape", hf_model=hf, tokenizer=tokenizer).eval()
    texts = seeded_corpus(24 if args.quick else 96)
    n_tokens = sum(len(t) + 1 for t in texts)
    runs = iter(range(1_000_000))

    def extract_row(backend: str, setting: str | None) -> Callable[[], Any]:
        def run() -> Any:
            out = workdir / f"extract-{next(runs)}"
            with cpu_gemm.use(setting):
                summary = extract(model, texts, HOOKS, out, backend=backend, progress=False, token_budget=4096)
            shutil.rmtree(out, ignore_errors=True)
            return summary

        return run

    def hand_row() -> Any:
        out = workdir / f"hand-{next(runs)}"
        out.mkdir()
        result = hand_rolled(hf, tokenizer, texts, 16, out)
        shutil.rmtree(out, ignore_errors=True)
        return result

    rows: dict[str, Callable[[], Any]] = {"HF + forward hooks (batch 16)": hand_row}
    for backend in ("eager", "compile"):
        if skip(f"extract {backend}") or (backend == "compile" and skip("compiled")):
            continue
        rows[f"t5hooks extract {backend}, cpu_gemm=mkl"] = extract_row(backend, "mkl")
        rows[f"t5hooks extract {backend} (auto)"] = extract_row(backend, None)
    print("extract: warming up (compiles the capture module) ...", flush=True)
    for fn in rows.values():
        fn()
    repeats = 1 if args.quick else 3
    times = interleaved(rows, repeats, warmup=0)
    base = times["HF + forward hooks (batch 16)"]
    print(
        f"\nextract: {len(texts)} prompts, {n_tokens} real tokens, capture {HOOKS}; median of {repeats} "
        "interleaved runs"
    )
    width = max(map(len, times))
    for name, seconds in times.items():
        print(f"{name:{width}}  {n_tokens / seconds:9,.0f} tok/s  {base / seconds:6.2f}x")


def generation_rows(
    args: Any, hf: Any, ours: Any, tokens: Any, mask: Any, workdir: Path, skip: Callable[[str], bool]
) -> None:
    from ...export import OnnxGenerator, to_onnx_generator

    new = args.new_tokens
    tok_np, mask_np = tokens.numpy(), mask.numpy()
    ort_row = "ORT generator (encoder + KV-cached step)"
    if not skip(ort_row):
        print("exporting: the ORT generator's graphs ...", flush=True)
        to_onnx_generator(ours, workdir / "generator")
        generator = OnnxGenerator(workdir / "generator", ["CPUExecutionProvider"], threads=args.threads)
    with torch.inference_mode():
        rows = {
            "HF generate (greedy)": lambda: hf.generate(
                input_ids=tokens, attention_mask=mask, max_new_tokens=new, do_sample=False, num_beams=1
            ),
            "t5hooks generate, cpu_gemm=mkl": lambda: generate_with(ours, "mkl", tokens, new, mask),
            "t5hooks generate (auto)": lambda: generate_with(ours, None, tokens, new, mask),
        }
        if not skip(ort_row):
            rows[ort_row] = lambda: torch.as_tensor(
                generator.generate(tok_np, new, one_zero_attention_mask=mask_np).tokens
            )
        results = {name: fn() for name, fn in rows.items()}
        first = results["HF generate (greedy)"]
        same = all(torch.equal(torch.as_tensor(r), first) for r in results.values())
        beam_note = ""
        if not skip("beam"):
            print("exporting: ORT's BeamSearch graph (onnxruntime.transformers.convert_generation) ...", flush=True)
            try:
                beam = ort_beam_search(hf, workdir / "ort_beam_search", args.threads)
            except Exception as err:  # noqa: BLE001 - reported with its reason, not fatal
                beam_note = (
                    f"ORT BeamSearch op: not run: {type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
                )
            else:
                name = "ORT BeamSearch op (convert_generation), num_beams=1"
                rows[name] = lambda: beam(tok_np, new)
                theirs = torch.as_tensor(rows[name]())
                if theirs.shape != first.shape:
                    beam_note = f"ORT BeamSearch op: {tuple(theirs.shape)} tokens vs HF's {tuple(first.shape)}"
                else:
                    same_rows = (theirs == first).all(dim=1)
                    unpadded = mask.all(dim=1)
                    beam_note = (
                        f"ORT BeamSearch op: tokens identical to HF on {int(same_rows.sum())} of {len(same_rows)} rows "
                        f"({int(same_rows[unpadded].sum())} of the {int(unpadded.sum())} unpadded rows; the graph has "
                        "no attention-mask input, so padded rows attend to their padding)"
                    )
        if not same:
            shapes = {k: tuple(torch.as_tensor(v).shape) for k, v in results.items()}
            print(f"generation disagrees: {shapes}", file=sys.stderr)
            raise SystemExit(1)
        times = interleaved(rows, max(1, (args.repeats or (2 if args.quick else 8)) // 2))
    base = times["HF generate (greedy)"]
    print(
        f"\ngenerate: greedy, {new} new tokens ({tuple(first.shape)} incl. start), same tokens in the t5hooks, ORT generator and HF rows"
    )
    if beam_note:
        print(beam_note)
    width = max(map(len, times))
    for name, seconds in times.items():
        print(f"{name:{width}}  {seconds * 1e3:8.1f} ms  {base / seconds:6.2f}x")


def generate_with(model: Any, setting: str | None, tokens: Any, new: int, mask: Any) -> Any:
    from ...kernels import cpu_gemm

    with cpu_gemm.use(setting):
        return model.generate(tokens, new, one_zero_attention_mask=mask)


def ort_beam_search(hf: Any, directory: Path, threads: int) -> Callable[[np.ndarray, int], np.ndarray]:
    """ONNX Runtime's own T5 generation graph (one `BeamSearch` node over encoder/decoder subgraphs), written
    by `onnxruntime.transformers.convert_generation` from the HF model saved here (offline). Its exporter is
    TorchScript-based at opset 12, which cannot export SDPA: the saved config asks for eager attention.
    Padding is read from the pad token (0); returns `run(tokens, new_tokens) -> [B, 1 + new_tokens]`."""
    import json
    import subprocess

    import onnxruntime as ort

    from ...export.ort import session_options

    directory.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(directory / "hf")
    config_path = directory / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config["_attn_implementation"] = config["attn_implementation"] = "eager"
    config_path.write_text(json.dumps(config))
    out = directory / "t5_beam_search.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "onnxruntime.transformers.convert_generation", "-m", str(directory / "hf")]
        + ["--model_type", "t5", "--output", str(out), "--disable_parity", "--disable_perf_test"],
        capture_output=True,
        text=True,
        cwd=directory,
        timeout=1800,
    )
    if result.returncode != 0 or not out.is_file():
        raise RuntimeError(result.stderr.strip() or result.stdout.strip() or "convert_generation wrote nothing")
    session = ort.InferenceSession(str(out), session_options(threads), providers=["CPUExecutionProvider"])

    def run(tokens: np.ndarray, new_tokens: int) -> np.ndarray:
        one = lambda v, dtype=np.int32: np.array([v], dtype=dtype)  # noqa: E731
        feeds = {
            "input_ids": tokens.astype(np.int32),
            "max_length": one(new_tokens + 1),
            "min_length": one(1),
            "num_beams": one(1),
            "num_return_sequences": one(1),
            "length_penalty": one(1.0, np.float32),
            "repetition_penalty": one(1.0, np.float32),
        }
        return session.run(None, feeds)[0][:, 0, :].astype(np.int64)

    return run


if __name__ == "__main__":
    raise SystemExit(main())
