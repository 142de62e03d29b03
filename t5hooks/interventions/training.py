"""Training spliced interventions (probes, steering vectors, DAS rotations) with the base model frozen.

`train_interventions` is the one loop: the interventions sit in a capture module (compiled with
`fullgraph=True, dynamic=True` by default), the model's own parameters are frozen, and `loss_fn(out, batch)`
scores the capture's output dict. `train_probe`, `train_steering` and `train_das` are thin task wrappers.
Token batches are dicts holding the capture module's arguments (`input`, `decoder_input`,
`one_zero_attention_mask`, `decoder_attention_mask`, `labels`) plus the task's targets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..atomic import atomic_path
from ..capture import CaptureModule
from .das import RotatedSubspaceInterchange, interchange_batch
from .probe import LinearProbe
from .steering import SteeringVector

CAPTURE_ARGS = ("input", "decoder_input", "one_zero_attention_mask", "decoder_attention_mask", "labels")
LossFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Tensor]


@dataclass
class InterventionResult:
    interventions: dict[str, nn.Module]
    losses: list[float] = field(default_factory=list)
    tokens_per_second: float = 0.0


def train_interventions(
    model: nn.Module,
    intervene: Mapping[str, nn.Module],
    batches: Iterable[Mapping[str, Tensor]],
    loss_fn: LossFn,
    *,
    steps: int,
    lr: float = 1e-2,
    warmup_steps: int = 0,
    compile: bool = True,
    prepare: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None,
    checkpoint_path: str | Path | None = None,
    progress: bool = False,
) -> InterventionResult:
    """Adam on the interventions' parameters for `steps` batches; the model stays frozen (restored after).

    `prepare(batch) -> capture kwargs` builds the capture's arguments (default: the batch's `CAPTURE_ARGS`).
    `checkpoint_path`: the trained interventions' state dicts (and losses) written there atomically at the end.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cap = CaptureModule(model, [], intervene=intervene)
    was_grad = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    params = [p for m in cap.interventions for p in m.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the interventions have no trainable parameters")
    optimizer = torch.optim.Adam(params, lr=lr)
    forward = torch.compile(cap, fullgraph=True, dynamic=True) if compile else cap
    prepare = prepare or (lambda b: {k: b[k] for k in CAPTURE_ARGS if b.get(k) is not None})
    losses: list[float] = []
    tokens = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, unit="step", leave=False)
    start = time.perf_counter()
    try:
        for step, batch in zip(range(steps), batches):
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr
            kwargs = prepare(batch)
            out = forward(**kwargs)
            loss = loss_fn(out, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            tokens += kwargs["input"].numel()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                bar.set_description(f"{tokens / (time.perf_counter() - start):,.0f} tok/s")
    finally:
        for p, g in zip(model.parameters(), was_grad):
            p.requires_grad_(g)
        if bar is not None:
            bar.close()
    if len(losses) < steps:
        raise ValueError(f"the batch source ran out after {len(losses)} of {steps} steps")
    rate = tokens / max(time.perf_counter() - start, 1e-9)
    if checkpoint_path is not None:
        save_interventions(cap.intervene, checkpoint_path, losses=losses)
    return InterventionResult(dict(cap.intervene), losses, rate)


def save_interventions(intervene: Mapping[str, nn.Module], path: str | Path, **extra: Any) -> Path:
    """`{hook: state_dict}` (+ extra) with torch.save, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"interventions": {h: m.state_dict() for h, m in intervene.items()}, **extra}, tmp)
        torch.load(tmp, weights_only=False)
    return path


# ---- tasks ------------------------------------------------------------------------------------------------
def train_probe(
    model: nn.Module,
    hook: str,
    batches: Iterable[Mapping[str, Tensor]],
    n_outputs: int,
    *,
    task: str = "classification",
    target_key: str = "targets",
    steps: int = 200,
    lr: float = 1e-2,
    **kwargs: Any,
) -> InterventionResult:
    """A linear probe at `hook` predicting `batch[target_key]`: class ids `[B, pos]` (-100 = ignore) for
    "classification" (cross-entropy), floats `[B, pos, n_outputs]` for "regression" (MSE)."""
    if task not in ("classification", "regression"):
        raise ValueError(f"task={task!r}; valid: 'classification', 'regression'")
    probe = LinearProbe(_width(model, hook), n_outputs)
    key = f"{hook}.{probe.output}"

    def loss_fn(out: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        pred, target = out[key], batch[target_key]
        if task == "classification":
            return F.cross_entropy(pred.reshape(-1, n_outputs), target.reshape(-1), ignore_index=-100)
        return F.mse_loss(pred, target.to(pred.dtype))

    return train_interventions(model, {hook: probe}, batches, loss_fn, steps=steps, lr=lr, **kwargs)


def train_steering(
    model: nn.Module,
    hook: str,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    positions: Sequence[int] | None = None,
    steps: int = 100,
    lr: float = 1e-2,
    **kwargs: Any,
) -> InterventionResult:
    """A steering vector at `hook` trained so the model's LM loss on `batch["labels"]` (the behaviour to steer
    towards) falls."""
    vector = SteeringVector(_width(model, hook), positions=positions)
    return train_interventions(model, {hook: vector}, batches, lambda out, b: out["loss"], steps=steps, lr=lr, **kwargs)


def train_das(
    model: nn.Module,
    hook: str,
    batches: Iterable[Mapping[str, Tensor]],
    k: int,
    *,
    positions: Sequence[int] | None = None,
    steps: int = 200,
    lr: float = 1e-2,
    **kwargs: Any,
) -> InterventionResult:
    """Distributed alignment search at `hook`: a rank-`k` subspace such that interchanging it from the source
    run into the base run makes the model produce the counterfactual `labels`.

    Batches: `input` / `source_input` `[B, E]` (one shape), optional `one_zero_attention_mask` /
    `source_attention_mask`, `labels` `[B, D]` (the counterfactual output of the base run), optional
    `decoder_input` / `source_decoder_input` (default: `labels` shifted right, for both runs). Base and source
    run in one forward (stacked on the batch axis); the loss is the LM loss of the base half.
    """
    das = RotatedSubspaceInterchange(_width(model, hook), k, positions=positions)
    return train_interventions(
        model,
        {hook: das},
        batches,
        lambda out, b: das_loss(out, b["labels"]),
        steps=steps,
        lr=lr,
        prepare=lambda b: interchange_inputs(model, b),
        **kwargs,
    )


def interchange_inputs(model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Capture arguments for one base + source forward (see `train_das` for the batch keys)."""
    base, source = batch["input"], batch["source_input"]
    ones = torch.ones_like(base)
    mask = interchange_batch(
        batch.get("one_zero_attention_mask", ones),
        batch.get("source_attention_mask", batch.get("one_zero_attention_mask", ones)),
    )
    dec = batch.get("decoder_input")
    if dec is None:
        dec = model.shift_right(batch["labels"])
    source_dec = batch.get("source_decoder_input", dec)
    return {
        "input": interchange_batch(base, source),
        "decoder_input": interchange_batch(dec, source_dec),
        "one_zero_attention_mask": mask,
    }


def das_loss(out: Mapping[str, Tensor], labels: Tensor) -> Tensor:
    """LM loss of the base half of an interchange batch against the counterfactual labels."""
    logits = out["logits"][: labels.shape[0]]  # [B, D, vocab]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _width(model: nn.Module, hook: str) -> int:
    """The last-axis size of the activation at `hook` (one tiny eager run)."""
    if hook not in model.hook_dict:
        model.resolve_names([hook])  # raises with suggestions
    tokens = torch.full((1, 2), model.cfg.pad_token_id + 1, device=model.W_E.device)
    with torch.no_grad():
        return CaptureModule(model, [hook])(tokens, tokens)[hook].shape[-1]
