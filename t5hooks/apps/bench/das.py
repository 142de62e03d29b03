"""`t5hooks bench das`: DAS training steps against pyvene's, on the same model, batches and initial rotation.

A randomly initialised T5 (Hugging Face `T5ForConditionalGeneration`; t5-small's shape by default with a smaller
vocabulary, `--vocab`) is wrapped by pyvene (`IntervenableModel` with a `LowRankRotatedSpaceIntervention` on the
output of encoder block `--layer`, at sequence position 1) and converted to a t5hooks model (`train_das` at
`encoder.{layer}.hook_resid_post`, the same position). Both rotations start from pyvene's initial weights and see
the same batches with the same Adam settings, so their losses must agree step by step (the table shows the
largest difference). Rows run interleaved (A, B, A, B, ...); each reports seconds per step (warm, median over
rounds) and the machine's load average. pyvene runs its source pass through the whole model; t5hooks stops the
source run at the hook (the encoder alone here) and keeps it out of the backward pass.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from .compiling import graphs_compiled


def build(args: argparse.Namespace):
    from transformers import T5Config, T5ForConditionalGeneration

    from ...model import HookedEncoderDecoder

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=args.vocab, d_model=args.d_model, d_kv=args.d_model // args.heads, d_ff=4 * args.d_model,
                   num_layers=args.layers, num_heads=args.heads, decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
    hf = T5ForConditionalGeneration(cfg).eval().requires_grad_(False)
    ours = HookedEncoderDecoder.from_pretrained("t5-bench", hf_model=hf).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.steps + 1):
        shape = (args.batch_size, args.encoder_len)
        batches.append({
            "input": torch.randint(3, args.vocab, shape, generator=g),
            "source_input": torch.randint(3, args.vocab, shape, generator=g),
            "labels": torch.randint(3, args.vocab, (args.batch_size, args.decoder_len), generator=g),
        })  # fmt: skip
    return hf, ours, batches


def pyvene_model(hf, args: argparse.Namespace):
    import pyvene as pv
    from pyvene.models.constants import CONST_OUTPUT_HOOK
    from pyvene.models.intervenable_modelcard import type_to_dimension_mapping, type_to_module_mapping

    kind = type(hf)  # pyvene has no T5 card: register the encoder blocks' outputs
    type_to_module_mapping[kind] = {"encoder_block_output": ("encoder.block[%s]", CONST_OUTPUT_HOOK)}
    type_to_dimension_mapping[kind] = {"encoder_block_output": ("d_model",)}
    config = pv.IntervenableConfig(
        representations=[
            {
                "layer": args.layer,
                "component": "encoder_block_output",
                "unit": "pos",
                "max_number_of_units": 1,
                "low_rank_dimension": args.k,
            }
        ],  # fmt: skip
        intervention_types=pv.LowRankRotatedSpaceIntervention,
    )
    model = pv.IntervenableModel(config, hf)
    model.disable_model_gradients()
    return model


def run_pyvene(hf, batches, args: argparse.Namespace, init: dict) -> tuple[float, list[float]]:
    model = pyvene_model(hf, args)
    (intervention,) = model.interventions.values()
    intervention = intervention[0] if isinstance(intervention, tuple) else intervention
    intervention.rotate_layer.load_state_dict(init)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    where = [[[1]] * args.batch_size]
    losses, seconds = [], []
    for b in batches:
        start = time.perf_counter()
        dec = hf._shift_right(b["labels"])
        _, out = model({"input_ids": b["input"], "decoder_input_ids": dec},
                       [{"input_ids": b["source_input"], "decoder_input_ids": dec}],
                       {"sources->base": (where, where)})  # fmt: skip
        loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), b["labels"].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
    return statistics.median(seconds[1:]), losses


def run_t5hooks(
    model, batches, args: argparse.Namespace, init: dict, compile: bool = False
) -> tuple[float, list[float]]:
    from ...interventions import RotatedSubspaceInterchange, train_das

    das = RotatedSubspaceInterchange(args.d_model, args.k, positions=[1])
    das.rotation.load_state_dict(init)
    seconds = []

    def timed():
        last = time.perf_counter()
        for b in batches:
            yield b
            now = time.perf_counter()
            seconds.append(now - last)
            last = now

    graphs = graphs_compiled()
    result = train_das(model, f"encoder.{args.layer}.hook_resid_post", timed(), args.k, steps=len(batches),
                       lr=args.lr, das=das, compile=compile)  # fmt: skip
    if compile:  # one graph per run (each run is a new capture module); more would be recompiles
        print(f"  (compiled: first step {seconds[0]:.1f} s, compile included; {graphs_compiled() - graphs} graph(s) "
              "for the run)", file=sys.stderr, flush=True)  # fmt: skip
    return statistics.median(seconds[1:]), result.losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t5hooks bench das", description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--layer", type=int, default=1, help="encoder block whose output is intervened on")
    parser.add_argument("--k", type=int, default=16, help="subspace rank")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--encoder-len", type=int, default=24)
    parser.add_argument("--decoder-len", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="add a compiled row (compile_capture; its first "
                        "step, which compiles, is not timed; the compile time is printed)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        import pyvene
    except ImportError:
        print("t5hooks bench das needs pyvene: pip install 't5hooks[test]'")
        return 2
    hf, ours, batches = build(args)
    with contextlib.redirect_stdout(io.StringIO()):
        init = {k: v.clone() for k, v in pyvene_model(hf, args).state_dict().items() if "rotate_layer" in k}
    init = {k.split("rotate_layer.")[1]: v for k, v in init.items()}
    print(
        f"T5 d_model {args.d_model}, {args.layers}+{args.layers} layers, {args.heads} heads, vocab {args.vocab}; "
        f"DAS rank {args.k} at encoder block {args.layer}'s output, position 1; batch {args.batch_size} x "
        f"{args.encoder_len} / {args.decoder_len} tokens; {args.steps} timed steps, {args.rounds} rounds; "
        f"torch {torch.__version__}, pyvene {getattr(pyvene, '__version__', '?')}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f} at start",
        flush=True,
    )
    runs = {"pyvene": lambda: run_pyvene(hf, batches, args, init),
            "t5hooks train_das": lambda: run_t5hooks(ours, batches, args, init)}  # fmt: skip
    if args.compile:
        runs["t5hooks compiled"] = lambda: run_t5hooks(ours, batches, args, init, compile=True)
    rows: dict[str, list[tuple[float, list[float], float]]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            load = os.getloadavg()[0]
            quiet = contextlib.redirect_stderr(io.StringIO()) if name == "pyvene" else contextlib.nullcontext()
            with contextlib.redirect_stdout(io.StringIO()), quiet:  # t5hooks's compile announcements stay visible
                seconds, losses = fn()
            rows[name].append((seconds, losses, (load + os.getloadavg()[0]) / 2))
    base = statistics.median(r[0] for r in rows["pyvene"])
    reference = rows["pyvene"][0][1]
    print(
        f"{'row':<20} {'s/step':>8} {'vs pyvene':>10} {'first loss':>11} {'last loss':>10} {'max |dloss|':>12} {'load':>6}"
    )
    for name, runs in rows.items():
        seconds = statistics.median(r[0] for r in runs)
        losses = runs[0][1]
        diff = max(abs(a - b) for a, b in zip(losses, reference))
        load = statistics.median(r[2] for r in runs)
        print(f"{name:<20} {seconds:>8.3f} {base / seconds:>9.2f}x {losses[0]:>11.4f} {losses[-1]:>10.4f} "
              f"{diff:>12.1e} {load:>6.1f}")  # fmt: skip
    return 0
