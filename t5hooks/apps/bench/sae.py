"""`t5hooks bench sae`: SAE training against SAELens's own trainer, speed and quality, on the same activations.

For each architecture (standard ReLU, TopK, BatchTopK), SAELens's training SAE is built with the given settings
and its initial weights are copied into t5hooks's trainer, whose configuration is converted from SAELens's
(`SAETrainConfig.from_saelens`: the same losses and schedules). Both then train on the same batches, rows
interleaved round by round (A, B, A, B, ...) so background load falls on every row alike:

* `SAELens`: `sae_lens.SAETrainer.step`, one call per batch (what `fit()` runs per step);
* `t5hooks`: `SAETrainer.train_step` (the eager sparse kernels, the default);
* `t5hooks, b_dec = mean`: the same with t5hooks's default start (the decoder bias at the first batch's mean);
* `t5hooks compiled` (`--compile`): the dense formulation under `torch.compile` (compile time reported apart).

Only the training steps are timed. Every `--eval-every` steps each row's explained variance on a held-out batch is
computed outside the timing (each library's training-mode forward), so the quality columns trace the curve. Every
row reports the machine's load average while it ran. `--store` adds store-fed rows: t5hooks trains from an
`ActivationStore` of t5hooks-tiny's `encoder.1.hook_resid_post` written by `extract` (the batches read from disk and shuffled as training runs) against
SAELens's trainer fed the same activations from memory.

Data (`--data`): `planted` (default): synthetic sparse activations (`--d-in`, 4 x d_in unit feature directions,
about 16 active per token, plus noise: structure an SAE can recover); `tiny`: t5hooks-tiny's
`decoder.1.hook_resid_post` (d_in 128) on random words.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ...interventions.sae_objective import Objective, training_step
from ...interventions.sae_training import SAETrainConfig, SAETrainer
from .. import intervention_data as data
from .compiling import graphs_compiled

HOOK = "decoder.1.hook_resid_post"
STORE_HOOK = "encoder.1.hook_resid_post"  # the encoder stream: one row per input token
SAELENS_CLASSES = {"standard": "StandardTrainingSAE", "topk": "TopKTrainingSAE", "batchtopk": "BatchTopKTrainingSAE"}


# ---- data ---------------------------------------------------------------------------------------------------
def planted_activations(n: int, d_in: int, seed: int = 0) -> Tensor:
    """`[n, d_in]`: sums of about 16 of `4 * d_in` unit directions with random magnitudes, plus small noise."""
    g = torch.Generator().manual_seed(seed)
    n_features = 4 * d_in
    directions = torch.randn(n_features, d_in, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    out = torch.empty(n, d_in)
    for lo in range(0, n, 4096):
        hi = min(n, lo + 4096)
        active = torch.rand(hi - lo, n_features, generator=g) < 16 / n_features
        codes = active * (torch.rand(hi - lo, n_features, generator=g) * 2 + 0.5)
        out[lo:hi] = codes @ directions + 0.05 * torch.randn(hi - lo, d_in, generator=g)
    return out + 0.5  # a mean offset, as residual streams have


def tiny_activations(n: int, seed: int = 0) -> Tensor:
    from ...interventions.live import LiveActivations
    from ...model import HookedEncoderDecoder

    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny").requires_grad_(False)
    chunks, total = [], 0
    for acts in LiveActivations(model, [HOOK], data.word_batches(model.tokenizer, 256, seed)):
        chunks.append(acts[HOOK])
        total += acts[HOOK].shape[0]
        if total >= n:
            break
    return torch.cat(chunks)[:n].contiguous()


# ---- one training run ---------------------------------------------------------------------------------------
def saelens_configs(args: argparse.Namespace, architecture: str, d_in: int) -> tuple[Any, Any]:
    import sae_lens
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    extra: dict[str, Any] = {"l1_coefficient": args.l1} if architecture == "standard" else {"k": args.k}
    sae_cfg = getattr(sae_lens, SAELENS_CLASSES[architecture] + "Config")(d_in=d_in, d_sae=args.d_sae, **extra)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch_size,
        train_batch_size_samples=args.batch_size,
        lr=args.lr,
        lr_end=args.lr,
        lr_decay_steps=args.steps // 5,
        dead_feature_window=args.dead_window,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
    )
    return sae_cfg, trainer_cfg


class Run:
    """One row's training from the shared initial weights: `step(batch)` (timed) and `ev(x)` (not timed)."""

    def __init__(self, kind: str, architecture: str, args: argparse.Namespace, init: dict[str, Tensor], d_in: int):
        import sae_lens

        self.kind, self.architecture = kind, architecture
        sae_cfg, trainer_cfg = saelens_configs(args, architecture, d_in)
        if kind == "SAELens":
            self.sae = getattr(sae_lens, SAELENS_CLASSES[architecture])(sae_cfg)
            self.trainer = sae_lens.SAETrainer(trainer_cfg, self.sae, iter(()))
            params = dict(self.sae.named_parameters())
        else:
            # "t5hooks": SAELens's configuration as converted; "t5hooks, b_dec = mean": with t5hooks's default start
            cfg = SAETrainConfig.from_saelens(sae_cfg, trainer_cfg, metrics_every=10**9)
            if "mean" in kind:
                cfg.b_dec_init = "mean"
            self.trainer = SAETrainer({"h": d_in}, cfg, compile="compiled" in kind)
            self.cfg = cfg
            params = dict(self.trainer.saes["h"].named_parameters())
        with torch.no_grad():
            for name, value in init.items():
                params[name].copy_(value)

    def step(self, batch: Tensor) -> None:
        if self.kind == "SAELens":
            self.trainer.step(batch)
            self.trainer.n_training_steps += 1
        else:
            self.trainer.train_step({"h": batch})

    @torch.no_grad()
    def ev(self, x: Tensor) -> tuple[float, float]:
        """(explained variance, L0) on `x`."""
        if self.kind == "SAELens":
            features = self.sae.encode(x)
            x_hat, l0 = self.sae.decode(features), float((features != 0).sum()) / x.shape[0]
        else:
            sae, cfg = self.trainer.saes["h"], self.cfg
            obj = Objective(cfg.architecture, cfg.k, 0.0, 0.0, cfg.aux_k, 0.0)
            dead = torch.zeros(cfg.d_sae, dtype=torch.bool)
            r = training_step(sae, x, obj, dead, x.shape[0])
            x_hat, l0 = r.x_hat, r.active / x.shape[0]
        return float(1 - (x - x_hat).square().sum() / (x - x.mean(0)).square().sum()), l0


def timed_run(
    make: Callable[[], Run], batches: Callable[[], Any], held_out: Tensor, eval_every: int
) -> tuple[float, dict[int, float], float]:
    """(tokens/s over the timed steps, {step: (held-out EV, L0)}, load average during the run)."""
    run = make()
    curve: dict[int, float] = {}
    seconds, tokens = 0.0, 0
    load = os.getloadavg()[0]
    for i, batch in enumerate(batches(), 1):
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            run.step(batch)
        seconds += time.perf_counter() - start
        tokens += batch.shape[0]
        if i % eval_every == 0:
            curve[i] = run.ev(held_out)
    return tokens / seconds, curve, (load + os.getloadavg()[0]) / 2


# ---- the benchmark ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t5hooks bench sae", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["planted", "tiny"], default="planted")
    parser.add_argument("--d-in", type=int, default=256, help="planted data's width (tiny: 128)")
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32, help="topk / batchtopk")
    parser.add_argument("--l1", type=float, default=2.0, help="standard's L1 coefficient")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=40, help="steps per timed run")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--dead-window", type=int, default=10, help="steps without firing before a feature is dead")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--architectures", nargs="+", default=list(SAELENS_CLASSES), choices=list(SAELENS_CLASSES))
    parser.add_argument("--compile", action="store_true", help="add compiled rows (inductor)")
    parser.add_argument("--store", action="store_true", help="add store-fed rows (TopK; tiny model activations)")
    parser.add_argument("--no-mean-row", action="store_true", help="skip the b_dec = mean row")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        import sae_lens
    except ImportError:
        print("t5hooks bench sae needs sae_lens: pip install 't5hooks[test]'")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.steps * args.batch_size
    x = planted_activations(n + 4096, args.d_in) if args.data == "planted" else tiny_activations(n + 4096)
    train, held_out = x[:n], x[n:]
    d_in = x.shape[1]
    print(
        f"{args.data} activations [d_in {d_in}], d_sae {args.d_sae}, k {args.k}, l1 {args.l1}, lr {args.lr}, "
        f"batch {args.batch_size}, {args.steps} steps per run, {args.rounds} interleaved rounds; "
        f"torch {torch.__version__}, sae_lens {sae_lens.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f} at start",
        flush=True,
    )
    rows = ["SAELens", "t5hooks"] + ([] if args.no_mean_row else ["t5hooks, b_dec = mean"])
    rows += ["t5hooks compiled"] if args.compile else []
    batches = lambda: train.split(args.batch_size)  # noqa: E731
    for architecture in args.architectures:
        torch.manual_seed(0)
        reference = getattr(sae_lens, SAELENS_CLASSES[architecture])(saelens_configs(args, architecture, d_in)[0])
        init = {name: p.detach().clone() for name, p in reference.named_parameters()}
        if args.compile:  # compile outside the timing: the graphs are cached for the timed rows (past the dead
            start = time.perf_counter()  # window, so the variant with the auxiliary loss compiles here too)
            warm = Run("t5hooks compiled", architecture, args, init, d_in)
            with contextlib.redirect_stderr(io.StringIO()):
                for batch in train.split(args.batch_size)[: args.dead_window + 2]:
                    warm.step(batch)
            print(f"  ({architecture}: compiling took {time.perf_counter() - start:.1f} s)", flush=True)
        graphs = graphs_compiled() if args.compile else 0
        results: dict[str, list] = {row: [] for row in rows}
        for _ in range(args.rounds):
            for row in rows:
                make = functools.partial(Run, row, architecture, args, init, d_in)
                results[row].append(timed_run(make, batches, held_out, args.eval_every))
        _report(architecture, results, args.eval_every, args.steps)
        if args.compile:  # new trainers, changing dead masks and L1 warm-up: none of it may compile again
            print(f"  ({architecture}: {graphs_compiled() - graphs} recompiles during the timed runs)", flush=True)
    if args.store:
        _store_rows(args)
    return 0


def _report(architecture: str, results: dict[str, list], eval_every: int, steps: int) -> None:
    points = list(range(eval_every, steps + 1, eval_every))
    base = statistics.median(r[0] for r in results["SAELens"])
    head = " ".join(f"{'EV@' + str(p):>8}" for p in points)
    print(f"\n{architecture:<10} {'trainer':<22} {'tokens/s':>10} {'vs SAELens':>10} {head} {'L0':>7} {'load':>6}")
    for row, runs in results.items():
        rate = statistics.median(r[0] for r in runs)
        evs = " ".join(f"{statistics.median(r[1][p][0] for r in runs):>8.4f}" for p in points)
        l0 = statistics.median(r[1][points[-1]][1] for r in runs)
        load = statistics.median(r[2] for r in runs)
        print(f"{'':<10} {row:<22} {rate:>10,.0f} {rate / base:>9.2f}x {evs} {l0:>7.1f} {load:>6.1f}", flush=True)


def _store_rows(args: argparse.Namespace) -> None:
    """TopK from an extracted store (t5hooks: ActivationStore.batches, read as it trains) vs SAELens from memory."""
    import random

    from ...model import HookedEncoderDecoder
    from ...store import ActivationStore, extract
    from ..reversal_task import random_word

    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny")
    rng = random.Random(0)
    need = args.steps * args.batch_size + 4096
    words = [" ".join(random_word(rng) for _ in range(4)) for _ in range(need // 25 + 1)]
    with tempfile.TemporaryDirectory(prefix="t5hooks-bench-store-") as tmp:
        extract(model, words, [STORE_HOOK], tmp, backend="eager", window=512, progress=False)
        store = ActivationStore(tmp)
        rows = store.num_rows(STORE_HOOK)
        held = min(4096, rows // 5)
        steps = min(args.steps, (rows - held) // args.batch_size)
        memory = store.load(STORE_HOOK)["acts"].float()
        held_out = memory[-held:]
        sub = argparse.Namespace(**{**vars(args), "steps": steps})
        sae_lens_batches = lambda: memory[: steps * args.batch_size].split(args.batch_size)  # noqa: E731
        store_batches = lambda: store.batches(STORE_HOOK, args.batch_size, seed=0)  # noqa: E731
        import sae_lens

        torch.manual_seed(0)
        reference = sae_lens.TopKTrainingSAE(saelens_configs(sub, "topk", 128)[0])
        init = {name: p.detach().clone() for name, p in reference.named_parameters()}
        results: dict[str, list] = {"SAELens": [], "t5hooks": []}
        for _ in range(args.rounds):
            results["SAELens"].append(
                timed_run(lambda: Run("SAELens", "topk", sub, init, 128), sae_lens_batches, held_out, args.eval_every)
            )
            results["t5hooks"].append(
                timed_run(
                    lambda: Run("t5hooks", "topk", sub, init, 128),
                    lambda: (b for _, b in zip(range(steps), store_batches())),
                    held_out,
                    args.eval_every,
                )
            )
        print(f"\nstore-fed: t5hooks-tiny {STORE_HOOK} [d_in 128], {rows} rows in {len(store.shards)} shards; t5hooks "
              "reads the store as it trains, SAELens gets the same activations from memory")  # fmt: skip
        _report("topk", results, args.eval_every, steps)
