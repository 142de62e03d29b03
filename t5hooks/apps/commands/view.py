"""`t5hooks view attention`: one input's attention patterns as a self-contained HTML page (see t5hooks.viz).

`register(subparsers)` adds the subcommand to the `t5hooks` parser.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..common import CliError, add_model_arguments, check_output


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `view` (with `attention`) to a `parser.add_subparsers()` object; returns the new subparser."""
    parser = subparsers.add_parser("view", help="interactive HTML views: 'attention' (encoder, decoder, cross)")
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    attention = sub.add_parser(
        "attention",
        help="encoder self-, decoder self- and cross-attention of one input as an HTML page",
        description="Run one input (and decoder text) and write its attention patterns as a page that opens "
        "from disk: layer and head pickers, one head or the mean of several, values on hover.",
    )
    attention.add_argument("input", help="input text")
    attention.add_argument("decoder", nargs="?", default=None, help="decoder text (default: the start token only)")
    add_model_arguments(attention, "shows")
    attention.add_argument("--out", required=True, metavar="FILE.html", help="page to write")
    attention.add_argument("--layers", type=int, nargs="+", default=None, help="only these layers")
    attention.add_argument("--force", action="store_true", help="replace an existing --out file")
    attention.add_argument("--device", default=None, help="cpu, cuda, ...")
    attention.set_defaults(func=run_view_attention)
    return parser


def run_view_attention(args: argparse.Namespace) -> int:
    from ..common import load_model

    check_output(args.out, force=args.force)
    model = load_model(args.model, args.device, "float32", subfolder=args.subfolder, encoder_only=args.encoder_only)
    if model.tokenizer is None:
        raise CliError("this model has no tokenizer: the attention view takes text")
    if not hasattr(model, "decode"):
        if args.decoder is not None:
            raise CliError("this is an encoder-only model: it takes no decoder text")
        view = model.attention_view(args.input, layers=args.layers)
    else:
        view = model.attention_view(args.input, args.decoder, layers=args.layers)
    path = view.save(args.out)
    kinds = ", ".join(view.data["attention"])
    print(f"attention view ({kinds}) of {len(view.data['tokens']['encoder'])} input tokens: {path}")
    return 0
