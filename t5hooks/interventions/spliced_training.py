"""Training modules spliced into a frozen model's forward: linear probes, steering vectors, DAS rotations.

`train_interventions` is the one loop: the interventions sit in a capture module, run eagerly until compiling
pays (`compile_capture`: regional, warm-started, announced; chosen by `compile_policy` from the measured eager
steps left, so on CPU, where compiling costs minutes and returns a few percent, short runs stay eager), the
model's own parameters are frozen, and `loss_fn(out, batch)` scores the capture's output dict. `train_probe`,
`train_steering` and `train_das` are thin task wrappers.
Token batches are dicts holding the capture module's arguments (`input`, `decoder_input`,
`one_zero_attention_mask`, `decoder_attention_mask`, `labels`) plus the task's targets; they are moved to the
model's device, where the interventions train.

Under torchrun each rank feeds its own batches; the interventions start from rank 0's initial values and their
gradients are averaged across ranks before every step (bucketed, as DistributedDataParallel does: the mean of the
ranks' mean losses); rank 0 writes the checkpoint.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..atomic import atomic_path, save_torch
from ..capture import CaptureModule, EncoderCaptureModule, compile_capture
from ..compile_policy import SwitchWhenPaid
from . import distributed
from .das import RotatedSubspaceInterchange
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
    compile: bool | str | None = None,
    prepare: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None,
    checkpoint_path: str | Path | None = None,
    progress: bool = False,
) -> InterventionResult:
    """Adam on the interventions' parameters for `steps` batches; the model stays frozen (restored after).

    `prepare(batch) -> capture kwargs` builds the capture's arguments (default: the batch's `CAPTURE_ARGS`, on
    the model's device). `checkpoint_path`: the trained interventions' state dicts (and losses) written there
    atomically at the end (by rank 0). `compile`: None runs eagerly and switches to the compiled capture once the
    eager steps left, at their measured speed, would save more than compiling is expected to cost (every rank
    switches at the same step); True compiles from the first step, a string names the `torch.compile` backend,
    False never compiles.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = _device(model)
    for module in intervene.values():
        module.to(device)
    cap = CaptureModule(model, [], intervene=intervene)
    was_grad = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    params = [p for m in cap.interventions for p in m.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the interventions have no trainable parameters")
    # every rank starts from rank 0's state: parameters and buffers (as DDP), e.g. the orthogonal
    # parametrisation's base of a DAS rotation, which a rank's own initialisation sets
    state = [t for m in cap.interventions for t in (*m.parameters(), *m.buffers()) if t.dtype != torch.bool]
    distributed.broadcast_parameters(state)
    optimizer = torch.optim.Adam(params, lr=lr)
    compiled = None
    if compile is not False:
        backend = compile if isinstance(compile, str) else "inductor"
        compiled = compile_capture(cap, backend=backend, announce=distributed.is_main())
    switch = None
    if compiled is not None and compile is None:
        switch = SwitchWhenPaid(compiled.expected_cost("training"), record=compiled.cache_entry("training"))
    forward = cap if compiled is None or switch is not None else compiled
    prepare = prepare or (lambda b: capture_args(b, device))
    world = distributed.rank_and_world()[1]
    losses: list[float] = []
    tokens = 0
    bar = None
    if progress and distributed.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, unit="step", leave=False)
    start = time.perf_counter()
    try:
        for step, batch in zip(range(steps), batches):
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr
            kwargs = prepare(batch)
            step_start = time.perf_counter()
            out = forward(**kwargs)
            loss = loss_fn(out, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # DDP's average of the ranks' gradients
                distributed.sum_gradients(params)
                for p in params:
                    p.grad.div_(world)
            optimizer.step()
            losses.append(float(distributed.all_reduce_sum(loss.detach().reshape(1))) / world)  # the global mean
            if switch is not None and forward is cap:  # eager so far: does compiling pay for the steps left?
                switch.observe(time.perf_counter() - step_start, 1)
                if distributed.any_rank(switch.should_compile(remaining_work=steps - step - 1), device):
                    forward = compiled
            elif switch is not None:  # compiled: its measured speed-up informs the next run's choice
                switch.observe_compiled(time.perf_counter() - step_start, 1)
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
    rate = tokens * world / max(time.perf_counter() - start, 1e-9)
    if checkpoint_path is not None and distributed.is_main():
        save_interventions(cap.intervene, checkpoint_path, losses=losses)
    return InterventionResult(dict(cap.intervene), losses, rate)


def capture_args(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The capture module's arguments of a token batch (`CAPTURE_ARGS` present in it), on `device`."""
    return {k: batch[k].to(device) for k in CAPTURE_ARGS if batch.get(k) is not None}


def save_interventions(intervene: Mapping[str, nn.Module], path: str | Path, **extra: Any) -> Path:
    """`{"interventions": {hook: state_dict}, **extra}` with torch.save, atomically; tensors and plain values
    only (`load_interventions` reads it with `weights_only=True`)."""
    path = Path(path)
    state = {h: {k: v.detach().cpu() for k, v in m.state_dict().items()} for h, m in intervene.items()}
    with atomic_path(path) as tmp:
        save_torch({"interventions": state, **extra}, tmp)
        load_interventions(tmp)  # verify before the rename
    return path


def load_interventions(path: str | Path) -> dict[str, Any]:
    """What `save_interventions` wrote, read with `weights_only=True` (nothing in the file can run code); a file
    that needs more is refused with a one-line ValueError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path}: refused: it holds Python objects beyond tensors and plain values (loading it could run code)"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("interventions"), dict):
        raise ValueError(f"{path}: not a t5hooks interventions file (no 'interventions' state dicts)")
    return state


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
    das: RotatedSubspaceInterchange | None = None,
    **kwargs: Any,
) -> InterventionResult:
    """Distributed alignment search at `hook`: a rank-`k` subspace such that interchanging it from the source
    run into the base run makes the model produce the counterfactual `labels`.

    Batches: `input` / `source_input` `[B, E]` (one shape), optional `one_zero_attention_mask` /
    `source_attention_mask`, `labels` `[B, D]` (the counterfactual output of the base run), optional
    `decoder_input` / `source_decoder_input` (default: `labels` shifted right, for both runs). Each step runs
    the source only up to `hook` (the encoder alone for an encoder hook), without autograd, then the base run
    with the interchange; the loss is the base run's LM loss. (`RotatedSubspaceInterchange` also takes the two
    runs stacked in one batch, `interchange_batch`, for a capture of your own.) `das`: a module to continue
    training (e.g. a previous run's, or one initialised like another library's); then `k` and `positions` are
    its own.
    """
    device = _device(model)
    if das is None:
        das = RotatedSubspaceInterchange(_width(model, hook), k, positions=positions)
    elif das.k != k:
        raise ValueError(f"das has rank {das.k}, k={k}")
    encoder_hook = model.layout.spec(hook).stack == "encoder" and hasattr(model, "decode")
    source_run = EncoderCaptureModule(model, [hook]) if encoder_hook else CaptureModule(model, [hook])

    def prepare(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        base, source = interchange_runs(model, batch, device)
        if encoder_hook:
            del source["decoder_input"]
        with torch.no_grad():
            das.source = source_run(**source)[hook]
        return base

    try:
        return train_interventions(
            model,
            {hook: das},
            batches,
            lambda out, b: das_loss(out, b["labels"].to(device)),
            steps=steps,
            lr=lr,
            prepare=prepare,
            **kwargs,
        )
    finally:
        das.source = None


def interchange_runs(
    model: nn.Module, batch: Mapping[str, Tensor], device: torch.device
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Capture arguments of the base run and of the source run (see `train_das` for the batch keys), on `device`."""
    base, source = batch["input"], batch["source_input"]
    if base.shape != source.shape:
        raise ValueError(f"base {tuple(base.shape)} and source {tuple(source.shape)} inputs must have one shape")
    mask = batch.get("one_zero_attention_mask", torch.ones_like(base))
    source_mask = batch.get("source_attention_mask", mask)
    dec = batch.get("decoder_input")
    if dec is None:
        dec = model.shift_right(batch["labels"])
    source_dec = batch.get("source_decoder_input", dec)
    base_run = {"input": base, "decoder_input": dec, "one_zero_attention_mask": mask}
    source_run = {"input": source, "decoder_input": source_dec, "one_zero_attention_mask": source_mask}
    return ({k: v.to(device) for k, v in base_run.items()}, {k: v.to(device) for k, v in source_run.items()})


def das_loss(out: Mapping[str, Tensor], labels: Tensor) -> Tensor:
    """LM loss of the base run (the first `len(labels)` rows of the logits) against the counterfactual labels."""
    logits = out["logits"][: labels.shape[0]]  # [B, D, vocab]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _width(model: nn.Module, hook: str) -> int:
    """The last-axis size of the activation at `hook` (one tiny eager run)."""
    if hook not in model.hook_dict:
        model.resolve_names([hook])  # raises with suggestions
    tokens = torch.full((1, 2), model.cfg.pad_token_id + 1, device=model.W_E.device)
    with torch.no_grad():
        return CaptureModule(model, [hook])(tokens, tokens)[hook].shape[-1]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
