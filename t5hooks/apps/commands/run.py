"""`t5hooks run`: one input through a model with the cache, its activations summarised (and saved)."""

from __future__ import annotations

import argparse

import torch

from ...dtypes import RUN_DTYPES, cli_dtype
from ..common import CliError, add_model_arguments, check_output, load_model


def parse_tokens(text: str, what: str) -> torch.Tensor:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError as err:
        raise CliError(f"--{what} must be space- or comma-separated integers, got {text!r}") from err
    if not ids:
        raise CliError(f"--{what} is empty")
    return torch.tensor([ids])


def cmd_run(args: argparse.Namespace) -> int:
    from ...analysis.summary import activation_table, strongest_attention_links, top_predictions
    from ...encoder import HookedT5Encoder

    if args.save:
        check_output(args.save, force=args.force, option="--save")
    model = load_model(args.model, args.device, args.dtype, subfolder=args.subfolder, encoder_only=args.encoder_only)
    encoder_only = isinstance(model, HookedT5Encoder)
    label = model.cfg.model_name
    from ...pretrained import describe

    print(f"model: {label} — {describe(label)}")
    layers = f"{model.cfg.n_layers} encoder layers" + (
        "" if encoder_only else f" + {model.cfg.n_decoder_layers} decoder layers"
    )
    print(f"       {layers}, d_model {model.cfg.d_model}, {model.cfg.n_heads} heads, vocab {model.cfg.d_vocab}")
    if args.tokens is not None:
        tokens = parse_tokens(args.tokens, "tokens")
    else:
        if model.tokenizer is None:
            raise CliError("this model has no tokenizer: pass --tokens '1 2 3'")
        tokens = model.to_tokens(args.text, move_to_device=False)
    if encoder_only and (args.decoder_tokens is not None or args.decoder_text is not None):
        raise CliError("this is an encoder-only model: it takes no --decoder-text / --decoder-tokens")
    if args.decoder_tokens is not None:
        dec = parse_tokens(args.decoder_tokens, "decoder-tokens")
    elif args.decoder_text is not None:
        if model.tokenizer is None:
            raise CliError("this model has no tokenizer: pass --decoder-tokens")
        dec = model.to_decoder_tokens(args.decoder_text, move_to_device=False)  # start token, text, no EOS
    else:
        dec = torch.full((1, 1), model.cfg.decoder_start_token_id)
    names = model.resolve_names(args.capture) if args.capture else None  # validates patterns early
    with torch.inference_mode():
        if encoder_only:
            hidden, cache = model.run_with_cache(tokens, names_filter=names)
        else:
            logits, cache = model.run_with_cache(tokens, dec, names_filter=names)

    def str_tokens(t: torch.Tensor) -> list[str]:
        if model.tokenizer is None:
            return [str(i) for i in t[0].tolist()]
        return model.to_str_tokens(t[0])

    enc_toks, dec_toks = str_tokens(tokens), str_tokens(dec)
    print(f"input:   {len(enc_toks)} tokens {''.join(enc_toks) if model.tokenizer else enc_toks}")
    if not encoder_only:
        print(f"decoder: {len(dec_toks)} tokens {dec_toks}")
    print(
        f"cached:  {len(cache)} activations, {sum(t.numel() * t.element_size() for t in cache.values()) / 1e6:.2f} MB\n"
    )
    default_show = ["hook_embed", "*.hook_resid_post", "hook_encoder_out"] + (
        [] if encoder_only else ["unembed.hook_in"]
    )
    show = args.show or default_show
    print(activation_table(cache, show))
    if any(n.endswith("hook_pattern") for n in cache):
        print("\nstrongest attention links")
        print(
            strongest_attention_links(
                cache,
                {"encoder": enc_toks, "decoder": dec_toks},
                {"encoder": enc_toks, "decoder": dec_toks},
                k=args.top_links,
            )
        )
    if encoder_only:
        norms = ", ".join(f"{v:.2f}" for v in hidden[0].norm(dim=-1).tolist())
        print(f"\nlast hidden state {list(hidden.shape)} (what a diffusion pipeline conditions on); norms: {norms}")
    else:
        decode = (lambda i: model.to_str_tokens([i])[0]) if model.tokenizer is not None else str
        print("\nnext-token predictions")
        print(top_predictions(logits, decode))
    if args.save:
        save_activations(dict(cache.items()), args.save, overwrite=args.force)
        print(f"\nsaved {len(cache)} activations to {args.save}")
    return 0


def save_activations(tensors: dict[str, torch.Tensor], path: str, *, overwrite: bool = True) -> None:
    """Activations as safetensors, atomically. Hook points often share memory (`decoder.0.hook_resid_post` is
    `decoder.1.hook_resid_pre`; q/k/v can be views of one projection), which safetensors refuses: every
    tensor that shares its storage or does not own it whole is written as its own copy."""
    from safetensors.torch import load_file, save_file

    from ...atomic import atomic_path

    owners: dict[int, int] = {}
    for t in tensors.values():
        key = t.untyped_storage().data_ptr()
        owners[key] = owners.get(key, 0) + 1
    out = {}
    for name, t in tensors.items():
        t = t.detach()
        whole = t.is_contiguous() and t.storage_offset() == 0 and t.nbytes == t.untyped_storage().nbytes()
        shared = owners[t.untyped_storage().data_ptr()] > 1
        out[name] = t.clone(memory_format=torch.contiguous_format) if shared or not whole else t
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file({k: v.cpu() for k, v in out.items()}, str(tmp))
        if sorted(load_file(str(tmp))) != sorted(out):
            raise RuntimeError(f"{path}: the written file does not hold the {len(out)} activations")


def register(sub) -> None:
    """Add `run` to a `parser.add_subparsers()` object."""
    run = sub.add_parser(
        "run",
        help="run a model with the cache and summarise its activations",
        description="Run one input through a model with every (or the chosen) hook point cached, "
        "and print shapes, norms, the strongest attention links and predictions.",
    )
    add_model_arguments(run, "runs")
    src = run.add_mutually_exclusive_group()
    src.add_argument("--text", default="hooked", help="input text (default: %(default)r)")
    src.add_argument("--tokens", default=None, help="input token ids instead of text, e.g. '5 6 7 1'")
    dsrc = run.add_mutually_exclusive_group()
    dsrc.add_argument("--decoder-text", default=None, help="decoder prefix text (default: just the start token)")
    dsrc.add_argument("--decoder-tokens", default=None, help="decoder input token ids (start token included)")
    run.add_argument(
        "--capture", nargs="+", default=None, metavar="PATTERN", help="hook names or globs to cache (default: all)"
    )
    run.add_argument(
        "--show",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="which cached names to tabulate (default: residual stream)",
    )
    run.add_argument("--top-links", type=_count, default=8, help="attention links to list, >= 0 (default: %(default)s)")
    run.add_argument("--save", default=None, metavar="FILE.safetensors", help="save the cached activations")
    run.add_argument("--force", action="store_true", help="replace an existing --save file")
    run.add_argument("--device", default=None, help="cpu, cuda, ...")
    run.add_argument("--dtype", default="float32", type=cli_dtype(RUN_DTYPES), help="float32, bfloat16 or float16")
    run.set_defaults(func=cmd_run)


def _count(text: str) -> int:
    """An integer >= 0 (argparse type: a bad value is a one-line usage error before any work)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0")
    return value
