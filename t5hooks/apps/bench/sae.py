"""`t5hooks bench sae`: SAE training tokens/s, t5hooks vs SAELens's trainer, on the same cached activations.

Activations of t5hooks-tiny's `decoder.1.hook_resid_post` are computed once into memory; then, interleaved
round by round (so background load falls on every row alike), the same TopK architecture, d_sae, k, batch
size and learning rate train for the same number of steps with
  * SAELens's `SAETrainer` on its `TopKTrainingSAE` (needs `pip install 't5hooks[test]'`),
  * t5hooks's `train_sae` eagerly and under `torch.compile`.
A last pair of rows trains live (no disk) from the model: two hooks from one forward vs one hook per run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator

import torch
from torch import Tensor

from ...interventions.live import LiveActivations
from ...interventions.sae_training import SAETrainConfig, train_sae, train_saes
from .. import intervention_data as data

HOOK = "decoder.1.hook_resid_post"
HOOKS = ["encoder.1.hook_resid_post", "decoder.1.hook_resid_post"]


def cached_activations(model, n_tokens: int, seed: int = 0) -> Tensor:
    live = LiveActivations(model, [HOOK], data.word_batches(model.tokenizer, 256, seed))
    chunks, total = [], 0
    for acts in live:
        chunks.append(acts[HOOK])
        total += acts[HOOK].shape[0]
        if total >= n_tokens:
            break
    return torch.cat(chunks)[:n_tokens].contiguous()


def cycling(x: Tensor, batch_size: int) -> Iterator[Tensor]:
    n = x.shape[0] // batch_size
    i = 0
    while True:
        yield x[(i % n) * batch_size : (i % n + 1) * batch_size]
        i += 1


def saelens_run(x: Tensor, args: argparse.Namespace) -> float:
    import sae_lens
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    cfg = sae_lens.TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=args.d_sae, k=args.k)
    sae = sae_lens.TopKTrainingSAE(cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch_size,
        train_batch_size_samples=args.batch_size,
        lr=args.lr,
        lr_end=args.lr,  # constant schedule, as the t5hooks rows
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = sae_lens.SAETrainer(trainer_cfg, sae, cycling(x, args.batch_size))
    start = time.perf_counter()
    _quiet(trainer.fit)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def t5hooks_run(x: Tensor, args: argparse.Namespace, compile: bool) -> float:
    cfg = SAETrainConfig(
        architecture="topk", d_sae=args.d_sae, k=args.k, lr=args.lr, total_steps=args.steps, metrics_every=args.steps
    )
    start = time.perf_counter()
    train_sae(cycling(x, args.batch_size), x.shape[1], cfg, progress=False, compile=compile)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def live_run(model, hooks: list[str], args: argparse.Namespace) -> float:
    """Tokens/s per SAE trained, live from the model (the forward included)."""
    cfg = SAETrainConfig(
        architecture="topk",
        d_sae=args.d_sae,
        k=args.k,
        lr=args.lr,
        total_steps=args.live_steps,
        metrics_every=args.live_steps,
    )
    live = LiveActivations(model, hooks, data.word_batches(model.tokenizer, 64, 1))
    start = time.perf_counter()
    result = train_saes(live, {h: model.cfg.d_model for h in hooks}, cfg, progress=False)
    tokens = result.metrics[-1]["tokens"]
    return tokens * len(hooks) / (time.perf_counter() - start)


def _quiet(fn):
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        return fn()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t5hooks bench sae", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=65_536, help="cached activations")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--steps", type=int, default=100, help="steps per timed run")
    parser.add_argument("--live-steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-saelens", action="store_true")
    args = parser.parse_args(argv)
    from ...model import HookedEncoderDecoder

    try:
        import sae_lens  # noqa: F401

        have_saelens = not args.no_saelens
    except ImportError:
        have_saelens = False
        print("(sae_lens not installed: pip install 't5hooks[test]' for the SAELens rows)")
    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny").requires_grad_(False)
    x = cached_activations(model, args.tokens)
    print(
        f"cached {x.shape[0]} activations of {HOOK} [d_in {x.shape[1]}]; TopK d_sae {args.d_sae}, k {args.k}, "
        f"batch {args.batch_size}, {args.steps} steps per run, {args.rounds} interleaved rounds, "
        f"{torch.get_num_threads()} threads"
    )
    rows: dict[str, list[float]] = {"saelens": [], "t5hooks eager": [], "t5hooks compiled": []}
    t5hooks_run(x, argparse.Namespace(**{**vars(args), "steps": 3}), compile=True)  # compile outside the timing
    for _ in range(args.rounds):
        if have_saelens:
            rows["saelens"].append(saelens_run(x, args))
        rows["t5hooks eager"].append(t5hooks_run(x, args, compile=False))
        rows["t5hooks compiled"].append(t5hooks_run(x, args, compile=True))
    live_rows = {"live, 2 hooks, one forward": [], "live, 1 hook per run": []}
    for _ in range(args.rounds):
        live_rows["live, 2 hooks, one forward"].append(live_run(model, HOOKS, args))
        live_rows["live, 1 hook per run"].append(2 / sum(1 / live_run(model, [h], args) for h in HOOKS))
    base = statistics.median(rows["saelens"]) if rows["saelens"] else None
    print(f"{'trainer':<30} {'tokens/s (median)':>18} {'vs SAELens':>11}")
    for name, values in {**rows, **live_rows}.items():
        if not values:
            continue
        med = statistics.median(values)
        ratio = f"{med / base:.2f}x" if base and name in rows else ""
        print(f"{name:<30} {med:>18,.0f} {ratio:>11}")
    return 0
