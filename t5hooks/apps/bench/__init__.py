"""The benchmarks, one module each: `t5hooks bench attention|model|cpu|extract|sae|das|dashboard|compiling`
(benchmarks/ holds thin wrappers). Each module's `main(argv)` parses its own arguments."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "attention": "the fused relative-bias attention kernels side by side",
    "model": "the whole model against Hugging Face eager and sdpa",
    "cpu": "every CPU fast path against Hugging Face, with the machine's GEMM GFLOP/s",
    "extract": "corpus extraction against a hand-rolled Hugging Face hook loop",
    "sae": "SAE training against SAELens's trainer (speed and quality per architecture)",
    "das": "DAS training steps against pyvene's",
    "compiling": "what compiling the capture costs (cold, warm, recompiles) and buys (step time vs eager)",
    "dashboard": "feature-dashboard build time against store size (4096 features, up to 1M tokens)",
}


def cmd_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"{__name__}.{args.what}")
    return module.main(args.rest)


def register(sub) -> None:
    """Add `bench` to a `parser.add_subparsers()` object."""
    bench = sub.add_parser(
        "bench",
        help="benchmarks: " + "; ".join(f"'{name}' ({what})" for name, what in BENCHMARKS.items()),
        description="Run a benchmark; arguments after the benchmark name go to it (try `t5hooks bench attention --help`).",
    )
    bench.add_argument("what", choices=list(BENCHMARKS), help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(func=cmd_bench)
