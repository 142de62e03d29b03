"""Benchmark relative-bias attention implementations side by side (`t5hooks bench attention`).

Implementations, each timed forward and forward+backward (gradients for q, k, v and the table):

* `triton`: this package's fused kernels (`relbias_attention(backend="triton")`, host prep included);
* `reference`: the eager path with the bias materialised (`reference_relbias_attention`);
* `sdpa-float-bias`: `scaled_dot_product_attention` with the bias + mask materialised as a float mask
  (built from the table inside the timed call, so the table gets its gradient);
* `flex`: FlexAttention (compiled) whose `score_mod` gathers the bias from the bucket table; the
  block mask (causal/padding) is built once outside the timing. Reported as failed, with the
  reason, when it does not compile or run;
* `sdpa-no-bias`: SDPA without any bias (only the causal/padding mask): the ceiling.

Speed is TFLOP/s with FlashAttention's convention: forward `4*B*H*Q*K*d`, backward 2.5x forward
(so forward+backward 3.5x), halved when causal. The decode case reports GB/s of K and V read.
Memory is the peak allocated on top of the inputs (`torch.cuda.max_memory_allocated` delta).
Results go to `<out>/attention.json` and `<out>/attention.png`.

On a machine without CUDA only `--quick` shapes run (fp32); the Triton kernels then run in the
interpreter if `TRITON_INTERPRET=1` is set, otherwise they are reported as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ...atomic import atomic_path
from ...dtypes import RUN_DTYPES, cli_dtype, parse_dtype
from ...kernels import prep
from ...kernels.op import relbias_attention
from ...kernels.policy import INTERPRETED
from ...kernels.reference import allowed_keys, bias_and_mask, position_bias, reference_relbias_attention
from ...tables import format_table
from ...timing import median_ms

IMPLEMENTATIONS = ("triton", "reference", "sdpa-float-bias", "flex", "sdpa-no-bias")
MODES = ("fwd", "fwd+bwd")
#: Published peak HBM bandwidth (GB/s) by device-name fragment, to put the decode case in context.
PEAK_HBM_GBPS = {"H200": 4800, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039, "A100": 1555}


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem: q `[B,H,Q,d]` against k/v `[B,H,K,d]`, T5 bucketing 32/128."""

    name: str
    batch: int
    heads: int
    q_len: int
    k_len: int
    head_dim: int
    causal: bool = False
    padded: bool = False  # right padding, row lengths spread between K/4 and K
    num_buckets: int = 32
    max_distance: int = 128

    @property
    def bidirectional(self) -> bool:  # T5: encoder (bidirectional) or decoder self-attention (causal)
        return not self.causal

    @property
    def q_offset(self) -> int:  # queries are the last Q positions (decode: Q new tokens after a cache)
        return self.k_len - self.q_len

    @property
    def decode(self) -> bool:
        return self.q_len < 16

    def flops(self, mode: str) -> float:
        fwd = 4.0 * self.batch * self.heads * self.q_len * self.k_len * self.head_dim
        if self.causal and self.q_len == self.k_len:
            fwd /= 2
        return fwd if mode == "fwd" else 3.5 * fwd

    def kv_bytes(self, element_size: int) -> int:
        return 2 * self.batch * self.heads * self.k_len * self.head_dim * element_size


def default_cases() -> list[Case]:
    """16k tokens per batch, 16 heads of 64: encoder and causal at L=512 and 2048, padding, one decode step."""
    return [
        Case("L512", 32, 16, 512, 512, 64),
        Case("L512-causal", 32, 16, 512, 512, 64, causal=True),
        Case("L2048", 8, 16, 2048, 2048, 64),
        Case("L2048-causal", 8, 16, 2048, 2048, 64, causal=True),
        Case("L2048-padded", 8, 16, 2048, 2048, 64, padded=True),
        Case("decode-8k", 16, 16, 1, 8192, 64, causal=True),
    ]


def quick_cases() -> list[Case]:
    """Tiny shapes for smoke tests (CPU, interpreter)."""
    return [
        Case("L40", 2, 2, 40, 40, 16, num_buckets=8, max_distance=16),
        Case("L40-causal", 2, 2, 40, 40, 16, causal=True, num_buckets=8, max_distance=16),
        Case("L40-padded", 2, 2, 40, 40, 16, padded=True, num_buckets=8, max_distance=16),
        Case("decode-64", 2, 2, 1, 64, 16, causal=True, num_buckets=8, max_distance=16),
    ]


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    inputs = dict(
        q=randn(case.batch, case.heads, case.q_len, case.head_dim),
        k=randn(case.batch, case.heads, case.k_len, case.head_dim),
        v=randn(case.batch, case.heads, case.k_len, case.head_dim),
        table=randn(case.num_buckets, case.heads),
        mask=None,
    )
    if case.padded:
        lengths = torch.linspace(case.k_len // 4, case.k_len, case.batch).long()
        inputs["mask"] = (torch.arange(case.k_len)[None, :] < lengths[:, None]).to(device)  # [B,K] bool
    return inputs


# --- implementations: each builder returns fn(q, k, v, table) -> out -------------------------


def build_triton(case: Case, mask: Tensor | None) -> Callable:
    def run(q, k, v, table):
        return relbias_attention(
            q, k, v, table, bidirectional=case.bidirectional, num_buckets=case.num_buckets,
            max_distance=case.max_distance, causal=case.causal, key_padding_mask=mask,
            q_offset=case.q_offset, backend="triton",
        )  # fmt: skip

    return run


def build_reference(case: Case, mask: Tensor | None) -> Callable:
    def run(q, k, v, table):
        return reference_relbias_attention(
            q, k, v, table, bidirectional=case.bidirectional, max_distance=case.max_distance,
            causal=case.causal, key_padding_mask=mask, q_offset=case.q_offset,
        )  # fmt: skip

    return run


def build_sdpa_float_bias(case: Case, mask: Tensor | None) -> Callable:
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run(q, k, v, table):
        bias = position_bias(
            table, case.q_len, case.k_len, bidirectional=case.bidirectional,
            max_distance=case.max_distance, q_offset=case.q_offset,
        )  # fmt: skip
        allowed = allowed_keys(
            mask, case.q_len, case.k_len, causal=case.causal, q_offset=case.q_offset, device=q.device
        )
        return sdpa(q, k, v, attn_mask=bias_and_mask(bias, allowed, dtype=q.dtype), scale=1.0)

    return run


def build_flex(case: Case, mask: Tensor | None) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    bound, offset = case.max_distance, case.q_offset
    compiled = torch.compile(flex_attention, dynamic=False)
    state: dict = {}  # bucket ids and block mask, made on the inputs' device at the first call

    def mask_mod(b, h, q_idx, kv_idx):
        visible = kv_idx >= 0
        if case.causal:
            visible = visible & (kv_idx <= q_idx + offset)
        if mask is not None:
            visible = visible & mask[b, kv_idx]
        return visible

    def run(q, k, v, table):
        if not state:
            state["buckets"] = prep.bucket_by_distance(
                case.num_buckets, case.max_distance, bidirectional=case.bidirectional, device=q.device
            ).long()
            state["block_mask"] = None
            if case.causal or mask is not None:
                batch = case.batch if mask is not None else None
                state["block_mask"] = create_block_mask(mask_mod, batch, None, case.q_len, case.k_len, device=q.device)
        buckets = state["buckets"]

        def score_mod(score, b, h, q_idx, kv_idx):
            distance = (kv_idx - q_idx - offset).clamp(-bound, bound) + bound
            return score + table[buckets[distance], h].to(score.dtype)

        return compiled(q, k, v, score_mod=score_mod, block_mask=state["block_mask"], scale=1.0)

    return run


def build_sdpa_no_bias(case: Case, mask: Tensor | None) -> Callable:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    # `is_causal` aligns the causal mask top-left, so it only fits when Q == K (no offset)
    is_causal = case.causal and case.q_offset == 0
    attn_mask = None
    if mask is not None or (case.causal and not is_causal):
        device = mask.device if mask is not None else None
        attn_mask = allowed_keys(
            mask, case.q_len, case.k_len, causal=case.causal, q_offset=case.q_offset, device=device
        )

    def run(q, k, v, table):
        m = attn_mask.to(q.device) if attn_mask is not None else None
        return sdpa(q, k, v, attn_mask=m, is_causal=is_causal, scale=1.0)

    return run


BUILDERS: dict[str, Callable[[Case, Tensor | None], Callable]] = {
    "triton": build_triton,
    "reference": build_reference,
    "sdpa-float-bias": build_sdpa_float_bias,
    "flex": build_flex,
    "sdpa-no-bias": build_sdpa_no_bias,
}


# --- measurement ------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], device: torch.device, quick: bool) -> float:
    """Median milliseconds per call: `triton.testing.do_bench` on CUDA (CUDA events if triton is
    missing), a plain timer on CPU."""
    if device.type == "cuda":
        warmup, rep = (5, 20) if quick else (25, 100)
        try:
            import triton.testing
        except ImportError:
            return cuda_event_ms(fn, warmup_ms=warmup, rep_ms=rep)
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    return median_ms(fn, repeats=1 if quick else 5)  # one warm-up call (compilation, caches)


def cuda_event_ms(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    times = []
    for _ in range(max(3, int(rep_ms / estimate))):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated by one call on top of what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def skip_reason(impl: str, case: Case, device: torch.device) -> str | None:
    if impl == "triton" and device.type != "cuda" and not INTERPRETED:
        return "no CUDA device and TRITON_INTERPRET is not set (set TRITON_INTERPRET=1 to use the interpreter)"
    return None


def measure(
    impl: str,
    fn: Callable,
    case: Case,
    inputs: dict,
    truth: Tensor,
    device: torch.device,
    modes: Sequence[str],
    quick: bool,
) -> list[dict]:
    """Time one implementation on one case; failures are recorded with their reason, not raised."""
    q, k, v, table = (inputs[name] for name in ("q", "k", "v", "table"))
    rows = []
    for mode in modes:
        row: dict = {"impl": impl, "mode": mode}
        try:
            if mode == "fwd":
                with torch.no_grad():
                    out = fn(q, k, v, table)
                    if impl != "sdpa-no-bias":  # the ceiling computes a different function (no bias)
                        row["max_abs_err"] = float((out.float() - truth).abs().max())

                    def call():
                        return fn(q, k, v, table)

                    row["peak_extra_mib"] = peak_extra_mib(call, device)
                    row["ms"] = time_ms(call, device, quick)
            else:
                leaves = [x.detach().requires_grad_() for x in (q, k, v, table)]
                grad_out = torch.randn_like(truth).to(q.dtype)

                def call(leaves=leaves, grad_out=grad_out):
                    out = fn(*leaves)
                    return torch.autograd.grad(out, leaves, grad_out, allow_unused=True)  # no-bias: table unused

                row["peak_extra_mib"] = peak_extra_mib(call, device)
                row["ms"] = time_ms(call, device, quick)
            row["status"] = "ok"
            row["tflops"] = case.flops(mode) / (row["ms"] * 1e-3) / 1e12
            if case.decode and mode == "fwd":
                row["gbps"] = case.kv_bytes(q.element_size()) / (row["ms"] * 1e-3) / 1e9
        except Exception as err:  # report and carry on: one broken implementation must not hide the rest
            row = {"impl": impl, "mode": mode, "status": "failed", "reason": f"{type(err).__name__}: {err}"[:500]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def run_case(
    case: Case,
    device: torch.device,
    dtype: torch.dtype,
    impls: Sequence[str],
    quick: bool,
    builders: dict[str, Callable] = BUILDERS,
) -> dict:
    inputs = make_inputs(case, device, dtype)
    with torch.no_grad():  # fp32 reference output, the yardstick for every implementation's error
        truth = build_reference(case, inputs["mask"])(*(inputs[n].float() for n in ("q", "k", "v", "table")))
    modes = ("fwd",) if case.decode else MODES
    results = []
    for impl in impls:
        reason = skip_reason(impl, case, device)
        if reason is not None:
            results.extend({"impl": impl, "mode": mode, "status": "skipped", "reason": reason} for mode in modes)
            continue
        try:
            fn = builders[impl](case, inputs["mask"])
        except Exception as err:
            results.extend(
                {"impl": impl, "mode": mode, "status": "failed", "reason": f"{type(err).__name__}: {err}"[:500]}
                for mode in modes
            )
            continue
        results.extend(measure(impl, fn, case, inputs, truth, device, modes, quick))
    return {"case": dataclasses.asdict(case) | {"q_offset": case.q_offset}, "results": results}


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})",
        "device_type": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "triton_interpret": INTERPRETED,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["peak_hbm_gbps"] = next((gbps for name, gbps in PEAK_HBM_GBPS.items() if name in env["device"]), None)
    return env


# --- reporting ---------------------------------------------------------------------------------


def format_report(report: dict) -> str:
    """The environment, a table of the measured rows, then the skipped or failed ones with their reasons."""
    env = report["environment"]
    lines = [
        f"device: {env['device']}   dtype: {env['dtype']}   torch {env['torch']}   triton {env['triton']}   "
        f"CUDA {env['cuda']}   python {env['python']}" + ("   (Triton interpreter)" if env["triton_interpret"] else ""),
    ]
    rows, notes = [], []
    for entry in report["cases"]:
        for r in entry["results"]:
            head = (entry["case"]["name"], r["impl"], r["mode"])
            if r["status"] != "ok":
                notes.append(f"{' '.join(head)}: {r['status']}: {r['reason']}")
                continue
            gbps = f"{r['gbps']:.0f}" if "gbps" in r else ""
            mib = f"{r['peak_extra_mib']:.1f}" if r.get("peak_extra_mib") is not None else ""
            err = f"{r['max_abs_err']:.1e}" if "max_abs_err" in r else ""
            rows.append((*head, f"{r['ms']:.3f}", f"{r['tflops']:.2f}", gbps, mib, err))
    header = ("case", "impl", "mode", "ms", "TFLOP/s", "GB/s", "extra MiB", "max err")
    lines.append(format_table(rows, header, align="lllrrrrr"))
    return "\n".join(lines + notes)


def plot(report: dict, path: Path) -> None:
    """Bars per case: TFLOP/s forward and forward+backward, and the decode cases' GB/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = list(dict.fromkeys(r["impl"] for entry in report["cases"] for r in entry["results"]))
    panels = [("fwd", "forward TFLOP/s", "tflops", False), ("fwd+bwd", "forward+backward TFLOP/s", "tflops", False),
              ("fwd", "decode GB/s (K and V read)", "gbps", True)]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    width = 0.8 / max(1, len(impls))
    for ax, (mode, title, key, decode) in zip(axes, panels):
        entries = [e for e in report["cases"] if (e["case"]["q_len"] < 16) == decode]
        names = [e["case"]["name"] for e in entries]
        for i, impl in enumerate(impls):
            values = []
            for e in entries:
                row = next((r for r in e["results"] if r["impl"] == impl and r["mode"] == mode), None)
                values.append(row[key] if row is not None and row["status"] == "ok" and key in row else 0.0)
            ax.bar([x + i * width for x in range(len(entries))], values, width, label=impl)
        ax.set_xticks([x + width * (len(impls) - 1) / 2 for x in range(len(entries))], names, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    env = report["environment"]
    fig.suptitle(f"relative-bias attention, {env['device']}, {env['dtype']}, torch {env['torch']}, triton {env['triton']}"
                 " (missing bar = failed or skipped)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="t5hooks bench attention",
        description="Benchmark fused relative-bias attention (Triton) against eager, SDPA and FlexAttention.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes, few repetitions (smoke test; forced without CUDA)"
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", type=cli_dtype(RUN_DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--cases", nargs="+", default=None, help="subset of case names to run")
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for attention.json/.png")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    quick = args.quick or device.type != "cuda"
    if quick and not args.quick:
        print("no CUDA device: running the --quick shapes")
    dtype = parse_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    cases = quick_cases() if quick else default_cases()
    if args.cases is not None:
        unknown = sorted(set(args.cases) - {c.name for c in cases})
        if unknown:
            print(f"error: unknown case(s) {unknown}; choose from {[c.name for c in cases]}", file=sys.stderr)
            return 2
        cases = [c for c in cases if c.name in args.cases]

    report = {"environment": environment(device, dtype), "quick": quick, "cases": []}
    report["notes"] = [
        "TFLOP/s: forward 4*B*H*Q*K*d, forward+backward 3.5x (FlashAttention convention), halved when causal",
        "triton, reference and sdpa-float-bias build their bias from the table inside each call; flex and "
        "sdpa-no-bias build their block/boolean masks once outside the timing",
        "max_abs_err: forward output against the reference computed in fp32 from the same inputs",
    ]
    for case in cases:
        print(f"running {case.name} ...", flush=True)
        report["cases"].append(run_case(case, device, dtype, args.impls, quick))

    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "attention.json"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"wrote {json_path}")
    if not args.no_plot:
        png_path = args.out / "attention.png"
        plot(report, png_path)
        print(f"wrote {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
