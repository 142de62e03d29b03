"""What compiling costs and buys (`t5hooks bench compiling`; also the compile section of `t5hooks bench cpu`).

The capture training step (forward + backward of `model.capture(every hook_resid_post)`, loss = LM loss +
1e-3 * mean square of the captured residuals; optimiser step excluded, it is the same eager code either way)
and the capture's inference forward, t5-small shape (the model of `t5hooks bench cpu`), batch 8, encoder 128
(padded rows), decoder 32, as rows:

* eager;
* `compile_capture` with regional compilation (one compiled region per stack, reused by every layer);
* `compile_capture(regional=False)`: the whole graph flat (skip with `--skip whole`; it compiles longest).

Per compiled row: the cold compile (a fresh process, empty caches: wall seconds and CPU seconds of the process
and its compiler children, C++ kernels built), the warm compile (a second fresh process: inductor's own cache
emptied, the t5hooks compile cache kept), the recompiles over a run of batch shapes (new batch size, new
lengths, a short last batch), and the steady-state step time against eager (rows interleaved in one process).
CPU seconds are printed beside wall seconds because on a shared machine the wall time of a compile is mostly
waiting for a core. Each measurement runs in its own child process.

    t5hooks bench compiling                 # training and inference rows
    t5hooks bench compiling --skip whole    # without the whole-graph row
    t5hooks bench compiling --quick         # tiny model (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESID = ["encoder.*.hook_resid_post", "decoder.*.hook_resid_post"]
VARIANTS = {"regional": {"regional": True}, "whole graph": {"regional": False}}
# a training run's batch shapes after the first: shorter and longer sequences, a smaller batch
SHAPES = [(8, 96, 24), (8, 120, 32), (6, 128, 32), (8, 64, 16), (8, 128, 32)]
QUICK_SHAPES = [(2, 18, 6), (3, 24, 8), (2, 12, 5)]


def build(quick: bool) -> tuple[Any, tuple[int, int, int]]:
    from ...model import HookedEncoderDecoder
    from .cpu import build as build_hf

    hf, _, shape = build_hf(quick)
    model = HookedEncoderDecoder.from_pretrained("t5-small-shape", hf_model=hf)
    return model, shape


def make_batch(model: Any, b: int, e: int, d: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Padded encoder rows (of e down to e - 7e/16 tokens), decoder tokens, labels."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    tokens = torch.randint(2, vocab, (b, e), generator=g)
    mask = torch.ones(b, e, dtype=torch.long)
    for row in range(b):
        cut = e - row * e // 16
        mask[row, cut:] = 0
        tokens[row, cut:] = 0
    dec = torch.randint(2, vocab, (b, d), generator=g)
    dec[:, 0] = model.cfg.decoder_start_token_id
    labels = torch.randint(2, vocab, (b, d), generator=g)
    return tokens, dec, mask, labels


def training_step(fn: Callable[..., dict[str, torch.Tensor]], model: Any, batch: tuple) -> Callable[[], None]:
    tokens, dec, mask, labels = batch

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = fn(tokens, dec, mask, labels=labels)
        penalty = sum(value.pow(2).mean() for name, value in out.items() if name.endswith("hook_resid_post"))
        (out["loss"] + 1e-3 * penalty).backward()

    return step


def inference_step(fn: Callable[..., dict[str, torch.Tensor]], batch: tuple) -> Callable[[], None]:
    tokens, dec, mask, _ = batch

    def step() -> None:
        with torch.no_grad():
            fn(tokens, dec, mask)

    return step


def step_for(kind: str, fn: Callable[..., dict[str, torch.Tensor]], model: Any, batch: tuple) -> Callable[[], None]:
    """The timed step of `kind` ("training" | "inference") through `fn` on `batch`."""
    return training_step(fn, model, batch) if kind == "training" else inference_step(fn, batch)


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ---- child processes ------------------------------------------------------------------------------


def child_compile(args: argparse.Namespace) -> dict[str, Any]:
    """One compile of one variant and kind in this fresh process: timings, kernels built, recompiles."""
    from ...capture import compile_capture

    model, shape = build(args.quick)
    cap = model.capture(RESID)
    fn = compile_capture(cap, cache=args.cache, announce=False, **VARIANTS[args.variant])
    batch = make_batch(model, *shape)
    step = step_for(args.kind, fn, model, batch)
    before, start = os.times(), time.perf_counter()
    step()
    wall, after = time.perf_counter() - start, os.times()
    result = {
        "wall_s": wall,
        "cpu_s": after.user + after.system - before.user - before.system,
        "children_cpu_s": after.children_user + after.children_system - before.children_user - before.children_system,
        "kernels": sum(1 for _ in Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).rglob("*.so")),
        "warm": fn.warm.get(args.kind, False),
    }
    graphs = graphs_compiled()
    for seed, other in enumerate(QUICK_SHAPES if args.quick else SHAPES):
        step_for(args.kind, fn, model, make_batch(model, *other, seed))()
    result["recompiles"] = graphs_compiled() - graphs
    return result


def child_steady(args: argparse.Namespace) -> dict[str, Any]:
    """Steady-state step times, eager and each compiled variant (warm from the cache), interleaved."""
    from ...capture import compile_capture
    from .cpu import interleaved

    model, shape = build(args.quick)
    batch = make_batch(model, *shape)
    rows: dict[str, Callable[[], None]] = {}
    for kind in ("training", "inference"):
        rows[f"{kind}: eager"] = step_for(kind, model.capture(RESID), model, batch)
        for variant in args.variants:
            fn = compile_capture(model.capture(RESID), cache=args.caches[variant], announce=False, **VARIANTS[variant])
            rows[f"{kind}: {variant}"] = step_for(kind, fn, model, batch)
    load = os.getloadavg()[0]
    times = interleaved(rows, args.repeats, warmup=2)
    return {"times": times, "load": [load, os.getloadavg()[0]]}


# ---- the parent: runs the children, prints the table --------------------------------------------


def run_child(argv: list[str], inductor_dir: str) -> dict[str, Any]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_dir}
    cmd = [sys.executable, "-m", "t5hooks.apps.bench.compiling", *argv]  # not __name__: "__main__" under -m
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_section(
    quick: bool = False, repeats: int = 5, skip: Callable[[str], bool] = lambda _: False, threads: int | None = None
) -> None:
    """Run the compile rows and print their table (the compile section of `t5hooks bench cpu`)."""
    variants = [v for v in VARIANTS if not skip(v.split()[0])]
    work = Path(tempfile.mkdtemp(prefix="t5hooks-bench-compile-"))
    caches = {v: str(work / f"cache-{v.replace(' ', '-')}") for v in variants}
    quick_flag = (["--quick"] if quick else []) + ["--threads", str(threads or os.cpu_count() or 1)]
    print(f"\ncompile cost (load average at start {os.getloadavg()[0]:.1f}) ...", flush=True)
    results: dict[tuple[str, str, str], dict[str, Any]] = {}
    for kind in ("training", "inference"):
        for variant in variants:
            for phase in ("cold", "warm"):
                inductor_dir = tempfile.mkdtemp(prefix="inductor-", dir=work)  # a new, empty inductor cache
                argv = ["--child", "compile", "--kind", kind, "--variant", variant, "--cache", caches[variant]]
                results[(kind, variant, phase)] = run_child(argv + quick_flag, inductor_dir)
                r = results[(kind, variant, phase)]
                print(f"  {kind}, {variant}, {phase}: {r['wall_s']:.0f} s wall", flush=True)
    steady_argv = ["--child", "steady", "--repeats", str(repeats), "--caches", json.dumps(caches), *quick_flag]
    steady = run_child(steady_argv + ["--variants", *variants], tempfile.mkdtemp(prefix="inductor-", dir=work))
    times = steady["times"]
    print(
        "\ncapture training step (forward + backward) and inference forward, "
        f"{'tiny' if quick else 't5-small'} shape, every hook_resid_post captured; compile times from fresh "
        f"processes (CPU s = the process and its C++ compiler children); steady state: median of {repeats} "
        f"interleaved runs, {threads or os.cpu_count()} torch threads, load average {steady['load'][0]:.1f} -> "
        f"{steady['load'][1]:.1f} on {os.cpu_count()} cores"
    )
    header = (
        f"{'row':34} {'cold wall s':>11} {'cold CPU s':>10} {'kernels':>7} {'warm wall s':>11} {'warm CPU s':>10} "
        f"{'recompiles':>10} {'step ms':>8} {'vs eager':>8}"
    )
    print(header)
    for kind in ("training", "inference"):
        eager = times[f"{kind}: eager"]
        print(
            f"{kind + ': eager':34} {'':>11} {'':>10} {'':>7} {'':>11} {'':>10} {'':>10} {eager * 1e3:8.1f} {1:7.2f}x"
        )
        for variant in variants:
            cold, warm = results[(kind, variant, "cold")], results[(kind, variant, "warm")]
            step = times[f"{kind}: {variant}"]
            print(
                f"{kind + ': ' + variant:34} {cold['wall_s']:11.1f} {cold['cpu_s'] + cold['children_cpu_s']:10.1f} "
                f"{cold['kernels']:7d} {warm['wall_s']:11.1f} {warm['cpu_s'] + warm['children_cpu_s']:10.1f} "
                f"{warm['recompiles']:10d} {step * 1e3:8.1f} {eager / step:7.2f}x"
                + ("" if warm["warm"] else "  (warm run missed the cache)")
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="t5hooks bench compiling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model and shapes (a smoke test)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed runs per steady-state row")
    parser.add_argument("--skip", nargs="*", default=[], metavar="WORD", help="leave out rows naming WORD (whole)")
    parser.add_argument("--child", choices=["compile", "steady"], help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=["training", "inference"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--variants", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--caches", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child == "compile":
        print(json.dumps(child_compile(args)))
        return 0
    if args.child == "steady":
        print(json.dumps(child_steady(args)))
        return 0
    words = [w.lower() for w in args.skip]
    compile_section(args.quick, args.repeats, lambda name: any(w in name.lower() for w in words), args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
