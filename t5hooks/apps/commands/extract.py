"""`t5hooks extract`: store the activations of every real token of a corpus (see t5hooks.store).

`register(subparsers)` adds the subcommand to the `t5hooks` parser. Run it under torchrun to split the
corpus over processes (each rank writes its own shards); re-run the same command to resume.
"""

from __future__ import annotations

import argparse
from typing import Any

from ...dtypes import RUN_DTYPES, STORAGE_DTYPES, cli_dtype
from ...store.config import BACKENDS, FORMATS
from ..common import add_model_arguments, process_group


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `extract` to a `parser.add_subparsers()` object; returns the new subparser."""
    parser = subparsers.add_parser(
        "extract",
        help="extract activations of a corpus into a resumable store (native or SAELens format)",
        description="Tokenise a corpus with the model's tokenizer, run it in token-budget batches bucketed by "
        "length, and store the chosen hooks' activations for every real token (with doc, pos, token_id). "
        "Re-run the same command to resume; under torchrun each rank extracts its slice.",
    )
    parser.add_argument("source", help="a .txt file (one prompt a line), a .jsonl file, or a datasets name/directory")
    parser.add_argument("out_dir", help="store directory (created; an existing store is resumed)")
    parser.add_argument(
        "--hooks",
        nargs="+",
        required=True,
        metavar="PATTERN",
        help="hook names or globs, e.g. 'encoder.*.hook_resid_post'",
    )
    add_model_arguments(parser, "runs")
    parser.add_argument("--field", default="text", help="JSONL / dataset field holding the prompt (default: text)")
    parser.add_argument(
        "--decoder-field", default=None, help="JSONL / dataset field with decoder targets (teacher forced)"
    )
    parser.add_argument("--split", default="train", help="dataset split (default: %(default)s)")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of loading it")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest prompt in tokens (default: %(default)s)")
    parser.add_argument("--truncate", action="store_true", help="cut longer prompts to --max-tokens instead of failing")
    parser.add_argument("--skip-empty", action="store_true", help="skip empty prompts instead of failing")
    parser.add_argument(
        "--dtype", default=None, type=cli_dtype(STORAGE_DTYPES), help="storage dtype (default: the model's)"
    )
    parser.add_argument(
        "--model-dtype", default="float32", type=cli_dtype(RUN_DTYPES), help="float32, bfloat16, float16"
    )
    parser.add_argument("--token-budget", type=int, default=8192, help="padded tokens per batch (default: %(default)s)")
    parser.add_argument(
        "--window", type=int, default=1024, help="look-ahead window = prompts per shard (default: %(default)s)"
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="auto (default): eager, compiled once the measured speed shows compiling pays for the rest of the job",
    )
    parser.add_argument("--format", choices=FORMATS, default="native", help="default: %(default)s")
    parser.add_argument("--context-size", type=int, default=None, help="tokens per packed row (--format saelens)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_extract)
    return parser


def run_extract(args: argparse.Namespace) -> int:
    """The `extract` handler. Raises ValueError for bad arguments (the CLI prints it, exit 2)."""
    import os

    import torch

    from ...store import extract
    from ..common import load_model

    device = args.device
    if device is None and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per torchrun process
    model = load_model(args.model, device, args.model_dtype, subfolder=args.subfolder, encoder_only=args.encoder_only)
    with process_group(device):  # the barrier before rank 0 packs a SAELens dataset
        summary = extract(
            model,
            args.source,
            args.hooks,
            args.out_dir,
            format=args.format,
            context_size=args.context_size,
            dtype=args.dtype,
            field=args.field,
            decoder_field=args.decoder_field,
            split=args.split,
            streaming=args.streaming,
            max_tokens=args.max_tokens,
            truncate=args.truncate,
            skip_empty=args.skip_empty,
            token_budget=args.token_budget,
            window=args.window,
            backend=args.backend,
            progress=not args.no_progress,
        )
        print(summary.line())
        if summary.saelens_dir is not None:
            print(f"SAELens dataset: {summary.saelens_dir} (cached_activations_path)")
    return 0
