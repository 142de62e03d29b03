"""Train the embedded `t5hooks-tiny` model: a byte-level T5 that reverses short lowercase strings.

Reversal has a mechanism you can see: decoder position i must read encoder position n-1-i, so
the cross-attention learns an anti-diagonal alignment. The training step runs the capture
module (eagerly, or compiled by `compile_capture` once the measured step time shows compiling pays for
the remaining steps; `--compile` / `--no-compile` decide it outright), reading the cross-attention
patterns as explicit outputs to report how much attention mass sits on the mirror position.

    t5hooks train-tiny --out my-tiny.safetensors

`--out` is checked before training and written (atomically) only when the held-out accuracy reaches
`--min-accuracy`. Load the result with `load_tiny(HookedEncoderDecoder, "my-tiny.safetensors")`.
The shipped weights in `t5hooks/assets/` are replaced only by a maintainer, deliberately
(`--out t5hooks/assets/t5hooks-tiny.safetensors --force`), never by accident.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch

from ...pretrained import save_tiny, tiny_config
from ...tokenizer import ByteTokenizer
from ..common import CliError, CommandFailed, check_output
from ..reversal_task import (
    MAX_LEN,
    MIN_LEN,
    exact_match_accuracy,
    held_out_words,
    make_batch,
    mirror_attention,
    random_word,
)


def train_tiny(
    out: str | Path | None = None,
    steps: int = 1200,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    compile: bool | None = None,
    progress: bool = True,
    min_accuracy: float = 0.0,
    overwrite: bool = True,
):
    """Train t5hooks-tiny from scratch; returns (model, held-out accuracy).

    `compile`: None (default) trains eagerly and switches to the compiled capture (regional, warm-started,
    announced) once the measured eager step time shows the remaining steps pay for compiling
    (`compile_policy`); True compiles from the first step, False never does.

    With `out`, writes safetensors there (atomically) only if the accuracy is at least `min_accuracy`;
    `out` is checked for writability before training (`overwrite=False`: it must not exist yet)."""
    from ...atomic import check_writable
    from ...capture import compile_capture
    from ...compile_policy import SwitchWhenPaid
    from ...model import HookedEncoderDecoder

    if out is not None:
        check_writable(out, overwrite=overwrite)

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = ByteTokenizer()
    held_out = set(held_out_words())
    model = HookedEncoderDecoder(tiny_config(seed=seed), tokenizer=tokenizer)
    cross = [f"decoder.{l}.cross_attn.hook_pattern" for l in range(model.cfg.n_decoder_layers)]
    cap = model.capture(cross)
    compiled = compile_capture(cap) if compile is not False else None
    switch = None
    if compile is None and compiled is not None:
        switch = SwitchWhenPaid(compiled.expected_cost("training"), record=compiled.cache_entry("training"))
    step_fn = compiled if compile else cap
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    bar = _progress(steps, progress)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        words = []
        while len(words) < batch_size:
            w = random_word(rng)
            if w not in held_out:
                words.append(w)
        batch = make_batch(words, tokenizer)
        step_start = time.perf_counter()
        out_dict = step_fn(batch.tokens, one_zero_attention_mask=batch.mask, labels=batch.labels)
        loss = out_dict["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if switch is not None and step_fn is cap:  # eager so far: does compiling pay for the remaining steps?
            switch.observe(time.perf_counter() - step_start, 1)
            if switch.should_compile(remaining_work=steps - step - 1):
                step_fn = compiled
        elif switch is not None:  # compiled: its measured speed-up informs the next run's choice
            switch.observe_compiled(time.perf_counter() - step_start, 1)
        if step % 50 == 0 or step == steps - 1:
            align = mirror_attention([out_dict[n] for n in cross], batch)
            bar.set_postfix(loss=f"{loss.item():.4f}", mirror_attn=f"{align.item():.2f}")
        bar.update(1)
    bar.close()
    model.eval()
    accuracy = exact_match_accuracy(model, sorted(held_out))
    minutes = (time.perf_counter() - start) / 60
    if progress:
        print(
            f"trained {steps} steps in {minutes:.1f} min; held-out exact-match accuracy {accuracy:.2%} "
            f"({len(held_out)} strings)"
        )
    if out is not None and accuracy >= min_accuracy:
        save_tiny(
            model,
            out,
            {
                "held_out_accuracy": accuracy,
                "train_minutes": round(minutes, 2),
                "steps": steps,
                "task": f"reverse lowercase strings of {MIN_LEN}-{MAX_LEN} characters",
            },
            overwrite=overwrite,
        )
    return model, accuracy


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="train-tiny", unit="step")


def cmd_train_tiny(args: argparse.Namespace) -> int:
    import math

    if args.steps < 1 or args.batch_size < 1:
        raise CliError(f"--steps and --batch-size must be >= 1, got {args.steps} and {args.batch_size}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise CliError(f"--lr must be a finite number > 0, got {args.lr}")
    if not 0 <= args.min_accuracy <= 1:
        raise CliError(f"--min-accuracy must be in [0, 1], got {args.min_accuracy}")
    if args.out:
        if not str(args.out).endswith(".safetensors"):
            raise CliError(f"--out {args.out!r}: the weights are written as a .safetensors file")
        check_output(args.out, force=args.force)  # before training, not after
    _, accuracy = train_tiny(
        out=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        compile=args.compile,
        min_accuracy=args.min_accuracy,
        overwrite=args.force,
    )
    if accuracy < args.min_accuracy:
        kept = f"; {args.out} not written" if args.out else ""
        raise CommandFailed(f"held-out accuracy {accuracy:.2%} is below --min-accuracy {args.min_accuracy:.2%}{kept}")
    print(f"wrote {args.out}" if args.out else "(not saved: pass --out FILE.safetensors)")
    return 0


def register(sub) -> None:
    """Add `train-tiny` to a `parser.add_subparsers()` object."""
    train = sub.add_parser(
        "train-tiny",
        help="train the embedded tiny model (string reversal, a few minutes on CPU)",
        description="Train t5hooks-tiny from scratch through a capture module (compiled when that pays); reports "
        "held-out exact-match accuracy. Exit status 1 if it is below --min-accuracy.",
    )
    train.add_argument(
        "--out",
        default=None,
        metavar="FILE.safetensors",
        help="where to write the weights (checked before training; written only if --min-accuracy is reached)",
    )
    train.add_argument("--force", action="store_true", help="replace an existing --out file")
    train.add_argument("--steps", type=int, default=1200)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--seed", type=int, default=0)
    choice = train.add_mutually_exclusive_group()
    choice.add_argument(
        "--compile", action="store_const", const=True, default=None, help="compile the training step from the start"
    )
    choice.add_argument(
        "--no-compile", dest="compile", action="store_const", const=False, help="train eagerly (no torch.compile)"
    )
    train.add_argument("--min-accuracy", type=float, default=0.99, help="in [0, 1] (default: %(default)s)")
    train.set_defaults(func=cmd_train_tiny)
