"""SAE demo on the embedded t5hooks-tiny: train, find a character feature, ablate it, export and check ORT.

1. Train a TopK SAE on a decoder residual stream from live activations (one capture forward per batch).
2. Find the feature most specific to one output character (decoder position i predicts the i-th character of
   the reversal, so the residual there carries it).
3. Ablate that feature (SAE spliced in WITH its error term: only the feature's decoder contribution is
   removed) and show the reversal break at that character and only there.
4. Export the SAE-spliced model to ONNX and show ONNX Runtime returns the same features.

    t5hooks sae-demo --out t5hooks-sae-demo
"""

from __future__ import annotations

import string
import time
from pathlib import Path

import torch
from torch import Tensor

from ...interventions.live import LiveActivations
from ...interventions.sae import SAE
from ...interventions.sae_training import SAETrainConfig, train_saes
from ...interventions.saelens_format import save_saelens
from .. import intervention_data as data
from ..reversal_task import PAD_TO, held_out_words, make_batch

HOOK = "decoder.1.hook_resid_post"


def char_feature(model, sae: SAE, words: list[str]) -> tuple[int, str, float, float]:
    """(feature, character, precision, recall): the feature whose firing best picks out one output character."""
    batch = make_batch(words, model.tokenizer)
    live = LiveActivations(model, [HOOK], [])
    acts = live.activations({"input": batch.tokens, "one_zero_attention_mask": batch.mask, "labels": batch.labels})
    with torch.no_grad():
        fires = sae.encode(acts[HOOK]) > 0  # [N, d_sae]
    labels = batch.labels[batch.labels != -100]  # [N] the character each position outputs
    a = model.tokenizer.encode("a")[0]
    chars = labels - a
    best = (-1.0, 0, 0, 0.0, 0.0)
    for c in range(26):
        is_c = chars == c
        if is_c.sum() < 10:
            continue
        hits = (fires & is_c[:, None]).sum(0).float()  # [d_sae]
        precision = hits / fires.sum(0).clamp_min(1)
        recall = hits / is_c.sum()
        score = precision * recall
        j = int(score.argmax())
        if float(score[j]) > best[0]:
            best = (float(score[j]), j, c, float(precision[j]), float(recall[j]))
    _, feature, c, precision, recall = best
    return feature, string.ascii_lowercase[c], precision, recall


def ablated(sae: SAE, feature: int) -> SAE:
    """The SAE spliced with its error term and `feature` zeroed: x - f_j * W_dec[j]."""

    def zero(features: Tensor) -> Tensor:
        return features * (torch.arange(features.shape[-1], device=features.device) != feature)

    sae.use_error_term = True
    sae.feature_edit = zero
    return sae


def first_error(output: str, target: str) -> int | None:
    for i, (a, b) in enumerate(zip(output, target)):
        if a != b:
            return i
    return None if len(output) == len(target) else min(len(output), len(target))


def run_sae_demo(out_dir: str | Path = "t5hooks-sae-demo", steps: int = 300, seed: int = 0, force: bool = False) -> int:
    from ...atomic import check_writable
    from ...export import OnnxRunner, to_onnx
    from ...model import HookedEncoderDecoder

    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; give a folder")
    for name in ("sae/cfg.json", "tiny_sae.onnx"):  # fail now, not after training
        try:
            check_writable(out_dir / name, overwrite=force)
        except FileExistsError:
            raise FileExistsError(
                f"--out {out_dir} holds a previous demo ({name}); pass --force to replace it"
            ) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny").requires_grad_(False)
    print(f"1. TopK SAE (d_sae 512, k 4) on {HOOK}, live activations of random words")
    cpu, wall = time.process_time(), time.perf_counter()
    live = LiveActivations(model, [HOOK], data.word_batches(model.tokenizer, 64, seed))
    cfg = SAETrainConfig(
        architecture="topk",
        d_sae=512,
        k=4,  # few features per token: a character is carried by one feature, whose ablation breaks it
        lr=3e-3,
        total_steps=steps,
        decay_steps=steps // 5,
        metrics_every=steps,
        seed=seed,
    )
    result = train_saes(live, {HOOK: model.cfg.d_model}, cfg, progress=False)
    sae = result.saes[HOOK]
    m = result.metrics[-1]
    print(
        f"   {steps} steps in {time.perf_counter() - wall:.1f} s wall / {time.process_time() - cpu:.1f} s CPU: "
        f"explained variance {m[HOOK + '/explained_variance']:.3f}, L0 {m[HOOK + '/l0']:.1f}"
    )
    save_saelens(sae, out_dir / "sae", hook_name=HOOK, model_name="t5hooks-tiny")

    words = held_out_words(400)
    feature, char, precision, recall = char_feature(model, sae, words)
    print(f"2. feature {feature} fires for output character {char!r}: precision {precision:.2f}, recall {recall:.2f}")

    with_char = [w for w in words if char in w][:200]
    without = [w for w in words if char not in w][:200]
    edited = ablated(sae, feature)
    hits_at_char = broke = kept = 0
    examples = []
    for w in with_char + without:
        clean = model.generate(w, max_new_tokens=PAD_TO + 1, return_type="str")
        with model.hooks(interventions={HOOK: edited}):
            out = model.generate(w, max_new_tokens=PAD_TO + 1, return_type="str")
        target = w[::-1]
        err = first_error(out, target)
        if w in with_char:
            if err is not None:
                broke += 1
                hits_at_char += target[err] == char
                if len(examples) < 3:
                    examples.append((w, clean, out, err))
        else:
            kept += err is None
    sae.feature_edit = None
    sae.use_error_term = False
    print(f"3. ablating feature {feature} (SAE spliced with its error term):")
    for w, clean, out, err in examples:
        print(
            f"   reverse({w!r}): clean {clean!r} -> ablated {out!r} (first error at {err}, where {w[::-1][err]!r} goes)"
        )
    print(
        f"   words with {char!r}: {broke}/{len(with_char)} break, {hits_at_char} of them first at {char!r}; "
        f"words without {char!r}: {kept}/{len(without)} still exact"
    )

    path = to_onnx(model, out_dir / "tiny_sae.onnx", capture=[HOOK], intervene={HOOK: sae})
    batch = make_batch(words[:8], model.tokenizer)
    dec = model.shift_right(batch.labels)
    with torch.no_grad():
        ref = model.capture([HOOK], intervene={HOOK: sae})(batch.tokens, dec, batch.mask, torch.ones_like(dec))
    got = OnnxRunner(path)(
        input=batch.tokens.numpy(),
        decoder_input=dec.numpy(),
        one_zero_attention_mask=batch.mask.numpy(),
        decoder_attention_mask=torch.ones_like(dec).numpy(),
    )
    key = HOOK + ".features"
    diff = float(abs(got[key] - ref[key].numpy()).max())
    same_active = bool(((got[key] > 0) == (ref[key] > 0).numpy()).all())
    print(
        f"4. ONNX graph with the SAE spliced: {path} outputs {list(got)};\n"
        f"   ORT features vs eager: max |diff| {diff:.2e}, same active set: {same_active}"
    )
    ok = result.metrics[-1][HOOK + "/explained_variance"] > 0.5 and diff < 1e-3 and hits_at_char > 0
    return 0 if ok else 1


def register(subparsers) -> None:
    """Add `sae-demo` to a `parser.add_subparsers()` object."""
    parser = subparsers.add_parser(
        "sae-demo",
        help="SAE on t5hooks-tiny: train, find a character feature, ablate it, export with ORT parity",
        description="Train a TopK SAE on decoder.1.hook_resid_post of t5hooks-tiny from live activations, find "
        "the feature most specific to one output character, ablate it and show the reversal break at that "
        "character, export the SAE-spliced model to ONNX and check ONNX Runtime returns the same features. "
        "Exit status 0 when all of that holds.",
    )
    parser.add_argument("--out", default="t5hooks-sae-demo", help="folder for the SAE and the ONNX file")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace the files of a previous demo in --out")
    parser.set_defaults(func=lambda args: run_sae_demo(args.out, steps=args.steps, seed=args.seed, force=args.force))
