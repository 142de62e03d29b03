"""`t5hooks train sae|probe|das`: train SAEs (from live activations or an activation store), linear probes and DAS
rotations at hook points, the base model frozen. A torchrun program.

Data: `--store DIR` (SAEs from `t5hooks extract`'s store: one pass feeds every SAE), the embedded reversal task
when the model is t5hooks-tiny and no file is given, else a text file (`sae`), JSONL `{"text", "label"}` (`probe`)
or JSONL `{"base", "source", "target"}` (`das`).

Under `torchrun --nproc-per-node N -m t5hooks.apps.cli train ...` every rank joins the process group (gloo on
CPU, nccl on CUDA, one GPU per rank), reads its own share of the data, trains on `--batch-size` per rank (a step
sees N times as many tokens) and averages gradients; the metrics count every rank's tokens and rank 0 alone
prints and writes.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import shutil
from pathlib import Path
from typing import Any

from .. import intervention_data as data
from ..common import CliError, check_output, process_group

# `--override` accepts these option names for the configuration fields they set
OPTION_FIELDS = {
    "lr": ("lr",),
    "l1": ("l1_coefficient",),
    "steps": ("total_steps", "warmup_steps", "decay_steps", "metrics_every"),
    "k": ("k",),
    "seed": ("seed",),
    "resample-every": ("resample_every",),
    "dead-after-steps": ("dead_after_tokens",),
    "batch-size": ("batch_size", "global_batch", "ranks", "dead_after_tokens"),
}


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `train` (with `sae`, `probe`, `das`) to a `parser.add_subparsers()` object."""
    parser = subparsers.add_parser(
        "train",
        help="train SAEs, a linear probe or a DAS rotation at hook points (base model frozen; torchrun-ready)",
        description="Train SAEs (live or from an activation store), probes and DAS rotations. Without a data "
        "file the embedded t5hooks-tiny reversal task is used. Run under torchrun to split the work.",
    )
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None, help="hub name, local directory or built-in name "
                       "(default: t5hooks-tiny, the embedded model)")  # fmt: skip
        p.add_argument("--steps", type=int, default=300)
        p.add_argument("--batch-size", type=int, default=32, help="sequences (SAE from a store: rows) per step "
                       "and rank")  # fmt: skip
        p.add_argument("--lr", type=float, default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--force", action="store_true", help="replace what a previous run wrote to --out")
        p.add_argument("--device", default="auto", help="auto (CUDA when present; under torchrun cuda:LOCAL_RANK), "
                       "cpu, cuda, cuda:N")  # fmt: skip
        p.add_argument(
            "--compile",
            action="store_true",
            default=None,
            help="compile the capture and the training step from the first step (default: each compiles once "
            "the measured eager steps would repay the compile, so on CPU short runs stay eager)",
        )
        p.add_argument("--no-compile", dest="compile", action="store_false", help="never compile")
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of a failure"
        )

    sae = sub.add_parser("sae", help="sparse autoencoders on one or more hooks, from one forward or one store pass")
    common(sae)
    sae.add_argument("--hook", nargs="+", required=True, metavar="NAME", help="hook names or globs (one SAE each)")
    sae.add_argument("--store", default=None, metavar="DIR", help="train from this activation store (t5hooks extract)")
    sae.add_argument("--architecture", choices=["topk", "batchtopk", "standard"], default="topk")
    sae.add_argument("--d-sae", type=int, default=512)
    sae.add_argument("--k", type=int, default=8, help="active features per token (topk/batchtopk)")
    sae.add_argument("--l1", type=float, default=5.0, help="L1 coefficient (standard)")
    sae.add_argument("--dead-after-steps", type=int, default=40, help="a feature that has not fired for more than "
                     "this many steps' tokens is dead (default: %(default)s)")  # fmt: skip
    sae.add_argument("--resample-every", type=int, default=None, metavar="STEPS", help="re-initialise dead features "
                     "every STEPS steps, 0 = never (default: 100 for standard, 0 for topk/batchtopk, whose "
                     "auxiliary loss revives dead latents)")  # fmt: skip
    sae.add_argument("--text", default=None, help="text file, one input per line")
    sae.add_argument("--checkpoint-every", type=int, default=100)
    sae.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    sae.add_argument("--override", nargs="+", default=(), metavar="OPTION", help="with --resume: options (or "
                     f"configuration fields) allowed to differ from the checkpoint's: {', '.join(OPTION_FIELDS)}")  # fmt: skip
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


# ---- checks before any work ---------------------------------------------------------------------------------
def _check_numbers(args: argparse.Namespace) -> None:
    """Every numeric option in range (finite, positive where it counts something), before anything is loaded."""
    ints = {"--steps": (args.steps, 1), "--batch-size": (args.batch_size, 1)}
    for option, attr, low in (("--d-sae", "d_sae", 1), ("--k", "k", 1), ("--checkpoint-every", "checkpoint_every", 0),
                              ("--resample-every", "resample_every", 0),
                              ("--classes", "classes", 2), ("--dead-after-steps", "dead_after_steps", 1)):  # fmt: skip
        if getattr(args, attr, None) is not None:
            ints[option] = (getattr(args, attr), low)
    for option, (value, low) in ints.items():
        if value < low:
            raise CliError(f"{option} must be >= {low}, got {value}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise CliError(f"--lr must be a finite number > 0, got {args.lr}")
    l1 = getattr(args, "l1", None)
    if l1 is not None and not (math.isfinite(l1) and l1 >= 0):
        raise CliError(f"--l1 must be a finite number >= 0, got {l1}")
    if getattr(args, "architecture", "standard") != "standard" and args.k > args.d_sae:
        raise CliError(f"--k {args.k} must not exceed --d-sae {args.d_sae}")


def _resample_every(args: argparse.Namespace) -> int:
    """--resample-every, or its default: 100 steps for the ReLU SAE, never for TopK / BatchTopK (their auxiliary
    loss on dead latents is SAELens's remedy)."""
    if args.resample_every is not None:
        return args.resample_every
    return 100 if args.architecture == "standard" else 0


def _check_out(args: argparse.Namespace, files: tuple[str, ...], resumable: bool) -> Path:
    """`--out` is a folder this run may write: not a file, writable, and not holding a previous run unless
    `--resume` (when `resumable`) or `--force`."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; give a folder")
    previous = [name for name in files if (out / name).exists()]
    resume = resumable and getattr(args, "resume", False)
    if previous and not resume and not args.force:
        hint = "--resume to continue it, --force to replace it" if resumable else "--force to replace it"
        raise CliError(f"--out {out} holds a previous run ({', '.join(previous)}); {hint}")
    if getattr(args, "override", ()) and not resume:
        raise CliError("--override changes a resumed run's settings: it needs --resume")
    check_output(out / files[0], force=True)  # the folder accepts new files (read-only: an error now)
    return out


def _device(args: argparse.Namespace) -> str | None:
    """`--device` for the model / SAEs: auto = CUDA when present (cuda:LOCAL_RANK under torchrun), else CPU."""
    import os

    import torch

    from ..common import resolve_device

    if args.device != "auto":
        return str(resolve_device(args.device))
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def _model(args: argparse.Namespace, device: str):
    from ..common import load_model

    model = load_model(args.model, device).requires_grad_(False)
    if model.tokenizer is None:
        raise CliError("this model has no tokenizer; load one with a tokenizer to train from text")
    return model


def _is_tiny(args: argparse.Namespace) -> bool:
    from ...pretrained import TRAINED_TINY

    return args.model in (None, TRAINED_TINY)


def _need_data(args: argparse.Namespace, option: str) -> None:
    if not _is_tiny(args) and getattr(args, option.lstrip("-").replace("-", "_")) is None:
        raise CliError(f"{option} is required for models other than t5hooks-tiny")


def _say(rank: int, *lines: str) -> None:
    if rank == 0:
        for line in lines:
            print(line, flush=True)


# ---- sae ----------------------------------------------------------------------------------------------------
SAE_RUN_FILES = ("checkpoint.pt", "metrics.json")


def cmd_train_sae(args: argparse.Namespace) -> int:
    from ...interventions.sae_training import SAETrainConfig, train_saes

    _check_numbers(args)
    if args.store is not None and (args.text is not None or args.model is not None):
        raise CliError("--store trains from stored activations: it takes no --model or --text")
    if args.store is None:
        _need_data(args, "--text")
    overrides = _override_fields(args.override)
    out = _check_out(args, SAE_RUN_FILES, resumable=True)
    device = _device(args)
    with process_group(device) as (rank, world):
        if args.store is not None:
            hooks, source, widths, evaluate, data_desc, step_tokens = _store_source(args, rank, world)
        else:
            hooks, source, widths, evaluate, data_desc, step_tokens = _live_source(args, device, rank, world)
        cfg = SAETrainConfig(
            architecture=args.architecture,
            d_sae=args.d_sae,
            k=args.k,
            l1_coefficient=args.l1,
            lr=args.lr or 2e-3,
            total_steps=args.steps,
            warmup_steps=min(20, args.steps // 10),
            decay_steps=args.steps // 5,
            dead_after_tokens=args.dead_after_steps * step_tokens,
            resample_every=_resample_every(args),
            metrics_every=max(1, min(50, args.steps)),
            checkpoint_every=args.checkpoint_every,
            seed=args.seed,
        )
        try:
            cfg.check()
        except ValueError as err:
            raise CliError(str(err)) from None
        if args.force and not args.resume and rank == 0:
            _remove_previous_run(out, hooks)
        result = train_saes(
            source,
            widths,
            cfg,
            checkpoint_dir=out,
            resume=args.resume,
            override=overrides,
            device=device,
            compile=args.compile,
            evaluate=evaluate,
            data=data_desc,
        )
    last = result.metrics[-1]
    lines = []
    for hook in hooks:
        ce = (
            f", CE loss recovered {last[f'{hook}/ce_loss_recovered']:.3f}"
            if f"{hook}/ce_loss_recovered" in last
            else ""
        )
        lines.append(f"{hook}: explained variance {last[f'{hook}/explained_variance']:.3f}, L0 "
                     f"{last[f'{hook}/l0']:.1f}, dead {last[f'{hook}/dead_fraction']:.1%}{ce}")  # fmt: skip
    ranks = f" over {world} ranks" if world > 1 else ""
    lines.append(f"{result.tokens_per_second:,.0f} tokens/s{ranks}; SAELens folders under {out}/<hook>/")
    _say(rank, *lines)
    return 0


def _override_fields(options: Any) -> tuple[str, ...]:
    """Option names (`lr`, `steps`, ...) -> the configuration fields they set; field names pass as they are
    (the trainer rejects unknown ones)."""
    fields: list[str] = []
    for option in options:
        name = option.lstrip("-")
        fields += OPTION_FIELDS.get(name, (name,))
    return tuple(dict.fromkeys(fields))


def _store_source(args: argparse.Namespace, rank: int, world: int):
    from ...store import ActivationStore

    store = ActivationStore(args.store)
    hooks: list[str] = []
    for pattern in args.hook:
        matched = [n for n in store.names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise CliError(f"--hook {pattern!r}: not in the store {args.store}; it holds {store.names}")
        hooks += [n for n in matched if n not in hooks]
    batches = store.batches(hooks, args.batch_size, args.seed, rank=rank, world_size=world)
    per_epoch = batches.batches_per_epoch()
    if per_epoch == 0:
        raise CliError(f"the store holds fewer rows than one global batch ({args.batch_size} x {world} ranks)")
    epochs = math.ceil(args.steps / per_epoch)
    if epochs > 1:
        batches = store.batches(hooks, args.batch_size, args.seed, rank=rank, world_size=world, epochs=epochs)
        _say(rank, f"{args.steps} steps = {args.steps / per_epoch:.2f} passes over the store ({per_epoch} global "
                   "batches each)")  # fmt: skip
    widths = {h: math.prod(store.shape(h)) for h in hooks}
    desc = {"source": f"store {Path(args.store).resolve()}", "hooks": hooks, "global_batch": args.batch_size * world,
            "seed": args.seed}  # fmt: skip
    return hooks, batches, widths, None, desc, args.batch_size * world


def _live_source(args: argparse.Namespace, device: str, rank: int, world: int):
    from ...interventions.live import LiveActivations, ce_loss_recovered

    model = _model(args, device)
    hooks = model.resolve_names(args.hook)
    if args.text is not None:
        batches = data.text_file_batches(args.text, model.tokenizer, args.batch_size, args.seed, rank, world)
        eval_batch = next(data.text_file_batches(args.text, model.tokenizer, args.batch_size, args.seed + 1))
    else:
        batches = data.word_batches(model.tokenizer, args.batch_size, args.seed + 7919 * rank)
        eval_batch = next(data.word_batches(model.tokenizer, args.batch_size, 10_000 + args.seed))
    eval_batch = {k: v.to(device) for k, v in eval_batch.items()}
    live = LiveActivations(model, hooks, batches, compile=args.compile)
    sample = live.activations(eval_batch)  # a batch's rows: its width, and about one step's tokens per rank
    widths = {h: v.shape[-1] for h, v in sample.items()}
    desc = {"source": f"text {Path(args.text).resolve()}" if args.text else "t5hooks-tiny reversal task",
            "model": model.cfg.model_name, "hooks": hooks, "batch_size": args.batch_size, "ranks": world,
            "seed": args.seed}  # fmt: skip
    step_tokens = sample[hooks[0]].shape[0] * world
    return hooks, live, widths, lambda saes: ce_loss_recovered(model, saes, eval_batch), desc, step_tokens


def _remove_previous_run(out: Path, hooks: list[str]) -> None:
    """--force: what a previous run wrote goes before this one starts (so it can never be resumed by mistake)."""
    for name in SAE_RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for hook in hooks:
        if (out / hook / "cfg.json").exists():
            shutil.rmtree(out / hook)


# ---- probe and DAS ------------------------------------------------------------------------------------------
def cmd_train_probe(args: argparse.Namespace) -> int:
    from ...interventions.spliced_training import train_probe

    _check_numbers(args)
    _need_data(args, "--data")
    out = _check_out(args, ("probe.pt",), resumable=False)
    device = _device(args)
    with process_group(device) as (rank, world):
        model = _model(args, device)
        if args.data is not None:
            records = data.jsonl_records(args.data, ("text", "label"))
            classes = args.classes or 1 + max(int(r["label"]) for r in records)
            batches = data.jsonl_label_batches(args.data, model.tokenizer, args.batch_size, args.seed, rank, world)
        else:
            classes = 26
            batches = data.char_target_batches(model.tokenizer, args.batch_size, args.seed + 7919 * rank)
        result = train_probe(
            model,
            args.hook,
            batches,
            classes,
            steps=args.steps,
            lr=args.lr or 1e-2,
            compile=args.compile,
            progress=True,
            checkpoint_path=out / "probe.pt",
        )
    _say(rank, f"probe at {args.hook}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; wrote {out}/probe.pt")
    return 0


def cmd_train_das(args: argparse.Namespace) -> int:
    from ...interventions.spliced_training import train_das

    _check_numbers(args)
    _need_data(args, "--data")
    out = _check_out(args, ("das.pt",), resumable=False)
    device = _device(args)
    with process_group(device) as (rank, world):
        model = _model(args, device)
        if args.data is not None:
            batches = data.jsonl_interchange_batches(
                args.data, model.tokenizer, args.batch_size, args.seed, rank, world
            )
        else:
            positions = args.position if args.position else [1]
            args.position = positions
            batches = data.char_swap_batches(model.tokenizer, args.batch_size, positions[0], args.seed + 7919 * rank)
        result = train_das(
            model,
            args.hook,
            batches,
            args.k,
            positions=args.position,
            steps=args.steps,
            lr=args.lr or 1e-2,
            compile=args.compile,
            progress=True,
            checkpoint_path=out / "das.pt",
        )
    _say(rank, f"DAS at {args.hook} (k={args.k}): loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; "
               f"wrote {out}/das.pt")  # fmt: skip
    return 0
