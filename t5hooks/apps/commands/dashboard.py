"""`t5hooks dashboard`: a static feature-dashboard site for an SAE over an activation store (see t5hooks.viz).

`register(subparsers)` adds the subcommand to the `t5hooks` parser.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..common import CliError, add_model_arguments


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `dashboard` to a `parser.add_subparsers()` object; returns the new subparser."""
    parser = subparsers.add_parser(
        "dashboard",
        help="build a feature dashboard (index + a page per feature) for an SAE over an activation store",
        description="Read the store once, encode it with the SAE in chunks, and write a static site that opens "
        "from disk: every feature in a sortable, searchable table, and a page per feature with its top "
        "activating contexts, samples from activation quantiles, the activation histogram, the logit effect "
        "(decoder-stream hooks) and the nearest features. Every page embeds its numbers as JSON.",
    )
    parser.add_argument("--store", required=True, help="activation store folder (t5hooks extract)")
    parser.add_argument(
        "--sae", required=True, help="SAE folder in SAELens's format (cfg.json + sae_weights.safetensors)"
    )
    parser.add_argument("--out", required=True, help="site folder to write (replaced only with --force)")
    parser.add_argument("--hook", default=None, help="the store's hook the SAE reads (default: the SAE's hook_name)")
    add_model_arguments(parser, "reads")
    parser.add_argument(
        "--no-model",
        action="store_true",
        help="do not load a model (token ids instead of text, no logit effect); by default the model the store "
        "records (or --model) is loaded and checked against the store's weight fingerprint",
    )
    parser.add_argument("--features", type=int, nargs="+", default=None, metavar="F", help="pages for these only")
    parser.add_argument(
        "--top-k", type=int, default=20, help="top activating examples per feature (default: %(default)s)"
    )
    parser.add_argument("--context", type=int, nargs=2, default=(10, 4), metavar=("BEFORE", "AFTER"),
                        help="tokens shown around each example (default: 10 4)")  # fmt: skip
    parser.add_argument("--chunk-rows", type=int, default=4096, help="tokens per SAE encoding (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the GPU when there is one)")
    parser.add_argument("--force", action="store_true", help="replace an existing dashboard at --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_dashboard)
    return parser


def run_dashboard(args: argparse.Namespace) -> int:
    from ...store import ActivationStore
    from ...viz import feature_dashboard
    from ..common import load_model, resolve_device

    store = ActivationStore(args.store)
    model = None
    if args.no_model and args.model:
        raise CliError("--model and --no-model contradict each other")
    if not args.no_model:
        name = args.model or store.config.get("model", {}).get("cfg", {}).get("model_name")
        if name is None:
            raise CliError("the store records no model name: pass --model (or --no-model)")
        model = load_model(name, None, "float32", subfolder=args.subfolder, encoder_only=args.encoder_only)
        print(f"model: {name} (checked against the store's weight fingerprint)")
    out = feature_dashboard(
        store,
        args.sae,
        args.out,
        hook=args.hook,
        model=model,
        features=args.features,
        top_k=args.top_k,
        context=tuple(args.context),
        chunk_rows=args.chunk_rows,
        device=resolve_device(args.device),
        overwrite=args.force,
        progress=not args.no_progress,
    )
    print(f"dashboard: {out / 'index.html'}")
    return 0
