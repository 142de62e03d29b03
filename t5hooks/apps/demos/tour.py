"""`t5hooks demo`: a guided tour on the embedded model, fully offline.

Loads t5hooks-tiny (trained to reverse strings), answers an example, shows its cross-attention
alignment (PNG heatmap and ASCII), finds the attention head whose ablation hurts most, exports
an ONNX graph with captured activations and checks ONNX Runtime against eager, and ends with a
timing table.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ...atomic import check_writable
from ...components import lm_loss
from ...tables import format_table
from ...timing import NOISY, machine_load, time_rows
from ..common import CliError
from ..reversal_task import MAX_LEN, MIN_LEN

SHADES = " .:-=+*#%@"
MAX_WORD = 64


def ascii_heatmap(values: Tensor, row_labels: list[str], col_labels: list[str]) -> str:
    """Rows x columns of values in [0, 1] as shaded characters, two per cell."""
    lines = ["      " + "".join(f"{c[:1]:>2}" for c in col_labels)]
    for label, row in zip(row_labels, values.tolist()):
        cells = "".join(2 * SHADES[min(len(SHADES) - 1, int(v * len(SHADES)))] for v in row)
        lines.append(f"{label[:4]:>4}  {cells}")
    return "\n".join(lines)


def run_demo(out_dir: str | Path | None = None, word: str = "interpret", force: bool = False) -> int:
    from ...export import OnnxRunner, to_onnx
    from ...model import HookedEncoderDecoder
    from ...pretrained import TRAINED_TINY

    if (
        not isinstance(word, str)
        or not word.strip()
        or len(word) > MAX_WORD
        or not (word.isascii() and word.isprintable())
    ):
        raise CliError(
            f"--word {word!r}: give a word of 1-{MAX_WORD} printable ASCII characters (the model was trained on "
            f"lowercase a-z words of {MIN_LEN}-{MAX_LEN} letters)"
        )
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="t5hooks-demo-"))
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder")
    for name in ("cross_attention.png", "t5hooks-tiny.onnx"):  # fail now, not after the analysis
        try:
            check_writable(out / name, overwrite=force)
        except FileExistsError:
            raise FileExistsError(f"--out {out} holds a previous demo ({name}); pass --force to replace it") from None
    out.mkdir(parents=True, exist_ok=True)
    model = HookedEncoderDecoder.from_pretrained(TRAINED_TINY)
    info = getattr(model, "info", {})
    print(
        f"1. model: {TRAINED_TINY} — {info.get('task', 'tiny T5')}; held-out exact match "
        f"{info.get('held_out_accuracy', float('nan')):.1%}; {sum(p.numel() for p in model.parameters()):,} parameters"
    )

    answer = model.generate(word, max_new_tokens=len(word) + 2)
    print(f"   {word!r} -> {answer!r}")

    # 2. cross-attention alignment, teacher-forced on the answer
    tokens = model.to_tokens(word)
    target = model.to_tokens(word[::-1])  # reversed bytes + EOS
    dec = model.shift_right(target)
    names = [f"decoder.{l}.cross_attn.hook_pattern" for l in range(model.cfg.n_decoder_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, dec, decoder_attention_mask=torch.ones_like(dec), names_filter=names)
    mirror = torch.arange(len(word) - 1, -1, -1)
    best_name, best_head, best_mass = None, 0, -1.0
    for name in names:
        mass = cache[name][0, :, torch.arange(len(word)), mirror].mean(-1)  # [H]
        if mass.max() > best_mass:
            best_name, best_head, best_mass = name, int(mass.argmax()), float(mass.max())
    pattern = cache[best_name][0, best_head]  # [D, E]
    enc_labels = model.to_str_tokens(tokens[0])
    dec_labels = ["<s>"] + model.to_str_tokens(target[0])[:-1]
    from ...analysis.plotting import heatmap

    png = out / "cross_attention.png"
    heatmap(
        pattern,
        dec_labels,
        enc_labels,
        title=f"{best_name} head {best_head}",
        xlabel="encoder token",
        ylabel="decoder input",
        colorbar_label="attention",
        cmap="Blues",
        center=None,
        path=png,
    )
    print(
        f"\n2. cross-attention of {best_name} head {best_head}: {best_mass:.0%} of the mass sits on the mirror "
        f"position (anti-diagonal). PNG: {png}"
    )
    print(ascii_heatmap(pattern, dec_labels, enc_labels))

    # 3. which head matters most: zero each head's z in turn on 200 held-out words (teacher-forced)
    from ..reversal_task import exact_match_accuracy, held_out_words, make_batch

    words = held_out_words()[:200]
    batch = make_batch(words, model.tokenizer)
    batch_dec = model.shift_right(batch.labels)
    batch_mask = torch.ones_like(batch_dec)  # causal: padding after the answer cannot change it (masks given)

    def answer_log_prob(hooks: list) -> float:
        with torch.no_grad():
            logits = model.run_with_hooks(
                batch.tokens,
                batch_dec,
                one_zero_attention_mask=batch.mask,
                decoder_attention_mask=batch_mask,
                fwd_hooks=hooks,
            )
        return -lm_loss(logits, batch.labels).item()  # mean log-probability of the answer tokens

    def zero_head(head: int):
        def hook(z: Tensor, hook) -> Tensor:  # z: [batch, pos, heads, d_head]
            z = z.clone()
            z[:, :, head] = 0
            return z

        return hook

    base = answer_log_prob([])
    results = []
    for stack, attn, layers in (
        ("encoder", "attn", model.cfg.n_layers),
        ("decoder", "attn", model.cfg.n_decoder_layers),
        ("decoder", "cross_attn", model.cfg.n_decoder_layers),
    ):
        for layer in range(layers):
            for head in range(model.cfg.n_heads):
                hook = (f"{stack}.{layer}.{attn}.hook_z", zero_head(head))
                results.append((answer_log_prob([hook]), hook, head))
    results.sort(key=lambda r: r[0])
    worst_lp, worst_hook, worst_head = results[0]
    with model.hooks(fwd_hooks=[worst_hook]):
        ablated_accuracy = exact_match_accuracy(model, words)
        ablated_answer = model.generate(word, max_new_tokens=len(word) + 2)
    print(
        f"\n3. zeroing one head at a time on {len(words)} held-out words: {worst_hook[0]} head {worst_head} hurts most. "
        f"Mean log-prob of the answers {base:.3f} -> {worst_lp:.3f}; exact-match accuracy "
        f"{exact_match_accuracy(model, words):.1%} -> {ablated_accuracy:.1%}; {word!r} -> {ablated_answer!r}"
    )
    rows = [(f"{hook[0]} H{head}", f"{lp - base:+.3f}") for lp, hook, head in results[:5]]
    print(format_table(rows, ("head zeroed", "change in mean log-prob")))

    # 4. ONNX export with captured activations, checked in ONNX Runtime against eager
    capture = names + ["decoder.*.hook_resid_post"]
    onnx_path = out / "t5hooks-tiny.onnx"
    to_onnx(model, onnx_path, capture=capture)
    runner = OnnxRunner(onnx_path)
    probe = model.to_tokens(["hooks", "onnx runtime"])
    mask = (probe != 0).long()
    probe_dec = model.shift_right(model.to_tokens(["skooh", "emitnur xnno"]))
    dec_mask = torch.ones_like(probe_dec)
    ort_out = runner(
        input=probe, decoder_input=probe_dec, one_zero_attention_mask=mask, decoder_attention_mask=dec_mask
    )
    with torch.no_grad():
        eager_out = model.capture(capture)(probe, probe_dec, mask, dec_mask)
    worst = max(float((torch.as_tensor(ort_out[k]) - eager_out[k]).abs().max()) for k in eager_out)
    print(
        f"\n4. ONNX export {onnx_path.name}: outputs {list(ort_out)[:3]} ... ({len(ort_out)} in all); "
        f"ONNX Runtime vs eager max |diff| {worst:.2e} {'OK' if worst < 1e-4 else 'MISMATCH'}"
    )
    if worst >= 1e-4:
        return 1

    # 5. timings: warmed up until stable, interleaved, median ± spread, beside the machine's load
    cap = model.capture(capture)
    with torch.inference_mode():
        timings = time_rows(
            [
                (
                    "eager forward",
                    lambda: model(probe, probe_dec, one_zero_attention_mask=mask, decoder_attention_mask=dec_mask),
                ),
                (
                    "run_with_cache (all hook points)",
                    lambda: model.run_with_cache(
                        probe, probe_dec, one_zero_attention_mask=mask, decoder_attention_mask=dec_mask
                    ),
                ),
                ("capture module (patterns + resid_post)", lambda: cap(probe, probe_dec, mask, dec_mask)),
                (
                    "ONNX Runtime (same outputs)",
                    lambda: runner(
                        input=probe,
                        decoder_input=probe_dec,
                        one_zero_attention_mask=mask,
                        decoder_attention_mask=dec_mask,
                    ),
                ),
                ("generate 12 tokens (batch 2)", lambda: model.generate(["hooks", "onnx runtime"], 12)),
            ],
            repeats=15,
            budget_s=10.0,
        )
    samples = next(iter(timings.values())).samples
    print(f"\n5. timings (CPU, batch 2; ms, median ± half the interquartile range of {samples} interleaved rounds "
          f"after a warm-up until stable; {machine_load()})")  # fmt: skip
    print(format_table([(name, t.cell()) for name, t in timings.items()], ("what", "ms")))
    if any(t.noisy for t in timings.values()):
        print(
            f"noisy: a spread over {NOISY:.0%} of the median; the machine is busy ({machine_load()}), so these rows "
            f"are not comparable: run again on a quiet machine"
        )
    print(f"\nfiles in {out}")
    return 0


def cmd_demo(args) -> int:
    return run_demo(args.out, word=args.word, force=args.force)


def register(sub) -> None:
    """Add `demo` to a `parser.add_subparsers()` object."""
    demo = sub.add_parser(
        "demo",
        help="a guided tour on the embedded model (offline)",
        description="Load the embedded t5hooks-tiny model, answer an example, show its cross-attention "
        "alignment (PNG + ASCII), find the most important head by ablation, export ONNX "
        "with captured activations and check ONNX Runtime parity, then time it all.",
    )
    demo.add_argument("--out", default="t5hooks-demo", help="folder for the PNG and ONNX files (default: %(default)s)")
    demo.add_argument("--word", default="interpret", help="lowercase word to reverse (default: %(default)s)")
    demo.add_argument("--force", action="store_true", help="replace the files of a previous demo in --out")
    demo.set_defaults(func=cmd_demo)
