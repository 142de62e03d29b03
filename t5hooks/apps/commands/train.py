"""`t5hooks train sae|probe|das`: train interventions on a model's activations (live, through the capture module).

Data: the embedded reversal task when the model is t5hooks-tiny and no file is given; else a text file
(`sae`), JSONL `{"text", "label"}` (`probe`) or JSONL `{"base", "source", "target"}` (`das`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import intervention_data as data


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `train` (with `sae`, `probe`, `das`) to a `parser.add_subparsers()` object."""
    parser = subparsers.add_parser(
        "train",
        help="train an SAE, a linear probe or a DAS rotation at hook points (base model frozen)",
        description="Train interventions spliced into the compiled capture graph. Without a data file the "
        "embedded t5hooks-tiny reversal task is used.",
    )
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None, help="hub name, local directory or built-in name (default: tiny)")
        p.add_argument("--steps", type=int, default=300)
        p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
        p.add_argument("--lr", type=float, default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--no-compile", action="store_true", help="run eagerly (no torch.compile)")

    sae = sub.add_parser("sae", help="sparse autoencoders on one or more hooks from one forward")
    common(sae)
    sae.add_argument("--hook", nargs="+", required=True, metavar="NAME", help="hook names (one SAE each)")
    sae.add_argument("--architecture", choices=["topk", "batchtopk", "standard"], default="topk")
    sae.add_argument("--d-sae", type=int, default=512)
    sae.add_argument("--k", type=int, default=8, help="active features per token (topk/batchtopk)")
    sae.add_argument("--l1", type=float, default=5.0, help="L1 coefficient (standard)")
    sae.add_argument("--text", default=None, help="text file, one input per line")
    sae.add_argument("--checkpoint-every", type=int, default=100)
    sae.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    sae.set_defaults(func=_holding_out(cmd_train_sae))

    probe = sub.add_parser("probe", help="a linear probe (classification) at one hook")
    common(probe)
    probe.add_argument("--hook", required=True)
    probe.add_argument("--data", default=None, help='JSONL {"text", "label"} (default tiny task: character identity)')
    probe.add_argument("--classes", type=int, default=None, help="number of classes (default: from the data)")
    probe.set_defaults(func=_holding_out(cmd_train_probe))

    das = sub.add_parser("das", help="distributed alignment search: a rank-k interchange subspace at one hook")
    common(das)
    das.add_argument("--hook", required=True)
    das.add_argument("--k", type=int, default=16, help="subspace rank")
    das.add_argument("--position", type=int, nargs="*", default=None, help="sequence positions (default: all)")
    das.add_argument(
        "--data",
        default=None,
        help='JSONL {"base", "source", "target"} (default tiny task: swap the character at --position)',
    )
    das.set_defaults(func=_holding_out(cmd_train_das))
    return parser


def _holding_out(command: Any) -> Any:
    """Run `command` holding an exclusive lock on `--out` (a hidden `.<name>.t5hooks-lock` beside it, so the
    folder itself is not created early): a second training into the same folder is refused, naming the
    first. Under torchrun only rank 0 writes, so only it locks."""

    def run(args: argparse.Namespace) -> int:
        import os

        from ...atomic import exclusive_lock

        if int(os.environ.get("RANK", "0")) != 0:
            return command(args)
        out = Path(args.out).absolute()
        with exclusive_lock(
            out.parent, f"t5hooks train {args.what} --out {args.out}", name=f".{out.name}.t5hooks-lock"
        ):
            return command(args)

    return run


def _model(args: argparse.Namespace):
    from ..common import CliError, load_model

    if args.steps < 1 or args.batch_size < 1:
        raise CliError("--steps and --batch-size must be positive")
    model = load_model(args.model).requires_grad_(False)
    if model.tokenizer is None:
        raise CliError("this model has no tokenizer; load one with a tokenizer to train from text")
    return model


def _is_tiny(args: argparse.Namespace) -> bool:
    return args.model in (None, "t5hooks-tiny")


def _need_data(args: argparse.Namespace, option: str) -> None:
    from ..common import CliError

    if not _is_tiny(args) and getattr(args, option.lstrip("-").replace("-", "_")) is None:
        raise CliError(f"{option} is required for models other than t5hooks-tiny")


def cmd_train_sae(args: argparse.Namespace) -> int:
    from ...interventions.live import LiveActivations, ce_loss_recovered
    from ...interventions.sae_training import SAETrainConfig, train_saes

    _need_data(args, "--text")
    model = _model(args)
    hooks = model.resolve_names(args.hook)
    if args.text is not None:
        batches, eval_batches = (
            data.text_file_batches(args.text, model.tokenizer, args.batch_size, s) for s in (args.seed, args.seed + 1)
        )
    else:
        batches, eval_batches = (
            data.word_batches(model.tokenizer, args.batch_size, s) for s in (args.seed, 10_000 + args.seed)
        )
    eval_batch = next(eval_batches)
    live = LiveActivations(model, hooks, batches, compile=not args.no_compile)
    widths = {h: v.shape[-1] for h, v in live.activations(eval_batch).items()}
    cfg = SAETrainConfig(
        architecture=args.architecture,
        d_sae=args.d_sae,
        k=args.k,
        l1_coefficient=args.l1,
        lr=args.lr or 2e-3,
        total_steps=args.steps,
        warmup_steps=min(20, args.steps // 10),
        decay_steps=args.steps // 5,
        resample_every=100 if args.architecture == "standard" else 0,
        metrics_every=max(1, min(50, args.steps)),
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    result = train_saes(
        live,
        widths,
        cfg,
        checkpoint_dir=args.out,
        resume=args.resume,
        compile=not args.no_compile,
        evaluate=lambda saes: ce_loss_recovered(model, saes, eval_batch),
    )
    last = result.metrics[-1]
    for hook in hooks:
        print(
            f"{hook}: explained variance {last[f'{hook}/explained_variance']:.3f}, L0 {last[f'{hook}/l0']:.1f}, "
            f"dead {last[f'{hook}/dead_fraction']:.1%}, CE loss recovered {last[f'{hook}/ce_loss_recovered']:.3f}"
        )
    print(f"{result.tokens_per_second:,.0f} tokens/s; SAELens folders under {Path(args.out)}/<hook>/")
    return 0


def cmd_train_probe(args: argparse.Namespace) -> int:
    from ...interventions.training import train_probe

    _need_data(args, "--data")
    model = _model(args)
    if args.data is not None:
        records = data.jsonl_records(args.data, ("text", "label"))
        classes = args.classes or 1 + max(int(r["label"]) for r in records)
        batches = data.jsonl_label_batches(args.data, model.tokenizer, args.batch_size, args.seed)
    else:
        classes = 26
        batches = data.char_target_batches(model.tokenizer, args.batch_size, args.seed)
    result = train_probe(
        model,
        args.hook,
        batches,
        classes,
        steps=args.steps,
        lr=args.lr or 1e-2,
        compile=not args.no_compile,
        progress=True,
        checkpoint_path=Path(args.out) / "probe.pt",
    )
    print(f"probe at {args.hook}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; wrote {args.out}/probe.pt")
    return 0


def cmd_train_das(args: argparse.Namespace) -> int:
    from ...interventions.training import train_das

    _need_data(args, "--data")
    model = _model(args)
    if args.data is not None:
        batches = data.jsonl_interchange_batches(args.data, model.tokenizer, args.batch_size, args.seed)
    else:
        positions = args.position if args.position else [1]
        args.position = positions
        batches = data.char_swap_batches(model.tokenizer, args.batch_size, positions[0], args.seed)
    result = train_das(
        model,
        args.hook,
        batches,
        args.k,
        positions=args.position,
        steps=args.steps,
        lr=args.lr or 1e-2,
        compile=not args.no_compile,
        progress=True,
        checkpoint_path=Path(args.out) / "das.pt",
    )
    print(
        f"DAS at {args.hook} (k={args.k}): loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; "
        f"wrote {args.out}/das.pt"
    )
    return 0
