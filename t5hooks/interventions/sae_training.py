"""Training sparse autoencoders: losses, the decoder-norm constraint, dead features, schedules, checkpoints.

`train_saes` trains one SAE per hook from any iterable of `{hook: [tokens, d_in]}` batches (or, for a single
SAE, `train_sae` from `[tokens, d_in]` batches): an `ActivationStore`'s `.batches(...)`, tensors in memory, or
live activations of a model (`live_activations`, several hooks from one compiled forward).

Losses (per SAE):
* "standard": `sum_d (x_hat - x)^2` (mean over tokens) + `l1_coefficient * sum_j f_j * ||W_dec[j]||` (L1 scaled
  by decoder norms, so shrinking the decoder cannot buy sparsity); dead features are resampled.
* "topk" / "batchtopk": reconstruction + `aux_coefficient *` the TopK auxiliary loss (Gao et al. 2024: the top
  `aux_k` dead latents reconstruct the residual error); decoder rows renormalised to unit norm after every step.

Checkpoints (`checkpoint_dir`, every `checkpoint_every` steps and at the end) hold the SAEs, optimiser,
schedule, dead-feature counters, RNG state and the step count; `resume=True` continues from the last one,
skipping the batches already consumed, so a killed run ends with the same weights as an uninterrupted one
(given a deterministic source). Under `torchrun` (torch.distributed initialised) each rank feeds its own batches
and gradients are averaged across ranks before every step, as DistributedDataParallel does.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..atomic import atomic_path
from .sae import SAE, build_sae
from .saelens_format import save_saelens

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class SAETrainConfig:
    """Hyper-parameters shared by the SAEs of one run."""

    architecture: str = "topk"  # "standard" | "topk" | "batchtopk"
    d_sae: int = 256
    k: int = 8  # active features per token (topk / batchtopk)
    l1_coefficient: float = 5.0  # standard
    aux_k: int | None = None  # dead latents in the TopK auxiliary loss (default: d_in // 2)
    aux_coefficient: float = 1 / 32
    lr: float = 4e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    total_steps: int = 1000
    warmup_steps: int = 0  # linear warm-up from 0
    decay_steps: int = 0  # linear decay to 0 over the last decay_steps
    l1_warmup_steps: int = 0  # standard: L1 coefficient ramps up from 0
    dead_after_tokens: int = 10_000  # a feature that has not fired for this many tokens is dead
    resample_every: int = 0  # standard: resample dead features every N steps (0 = never)
    metrics_every: int = 50
    checkpoint_every: int = 0  # 0 = only at the end
    seed: int = 0

    def check(self) -> None:
        if self.architecture not in ("standard", "topk", "batchtopk"):
            raise ValueError(f"architecture={self.architecture!r}; trainable: 'standard', 'topk', 'batchtopk'")
        for name in ("d_sae", "k", "total_steps", "metrics_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError("warmup_steps + decay_steps must not exceed total_steps")


@dataclass
class TrainResult:
    saes: dict[str, SAE]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    tokens_per_second: float = 0.0


# ---- losses and metrics ---------------------------------------------------------------------------------
def sae_loss(sae: SAE, x: Tensor, cfg: SAETrainConfig, dead: Tensor | None, l1_scale: float = 1.0) -> dict:
    """Training loss of one SAE on `x [tokens, d_in]`; returns loss, features, reconstruction."""
    pre = sae.pre_acts(x)  # [N, d_sae]
    features = sae.activation(pre)
    x_hat = sae.decode(features)
    mse = (x_hat - x).square().sum(-1).mean()
    loss = mse
    if cfg.architecture == "standard":
        sparsity = (features * sae.W_dec.norm(dim=1)).sum(-1).mean()
        loss = loss + l1_scale * cfg.l1_coefficient * sparsity
    elif dead is not None and (torch.compiler.is_compiling() or bool(dead.any())):  # eager: skip when none dead
        loss = loss + cfg.aux_coefficient * topk_aux_loss(sae, pre, x - x_hat.detach(), dead, cfg.aux_k)
    return {"loss": loss, "features": features, "x_hat": x_hat}


def topk_aux_loss(sae: SAE, pre: Tensor, residual: Tensor, dead: Tensor, aux_k: int | None) -> Tensor:
    """The `aux_k` largest dead pre-activations reconstruct the residual error (normalised by its variance);
    zero when no feature is dead. No data-dependent branch: compiles whole."""
    aux_k = min(aux_k or sae.d_in // 2, sae.d_sae)
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))  # [N, d_sae]
    values, indices = masked.topk(aux_k, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values).nan_to_num(0.0))
    residual_hat = acts @ sae.W_dec
    err = (residual_hat - residual).square().sum(-1).mean()
    denom = (residual - residual.mean(0)).square().sum(-1).mean().clamp_min(1e-8)
    return (err / denom).nan_to_num(0.0) * dead.any()


@torch.no_grad()
def reconstruction_metrics(x: Tensor, x_hat: Tensor, features: Tensor) -> dict[str, float]:
    """Explained variance `1 - |x - x_hat|^2 / |x - mean x|^2`, L0 (active features per token), MSE."""
    resid = (x - x_hat).square().sum()
    total = (x - x.mean(0)).square().sum().clamp_min(1e-12)
    return {
        "explained_variance": float(1 - resid / total),
        "l0": float((features > 0).float().sum(-1).mean()),
        "mse": float((x - x_hat).square().sum(-1).mean()),
    }


def lr_factor(step: int, cfg: SAETrainConfig) -> float:
    """Linear warm-up, constant, linear decay to 0 over the last `decay_steps`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = cfg.total_steps - cfg.decay_steps
    if cfg.decay_steps and step >= decay_start:
        return max(0.0, (cfg.total_steps - step) / cfg.decay_steps)
    return 1.0


# ---- the trainer ----------------------------------------------------------------------------------------
class SAETrainer:
    """One SAE per hook, one optimiser, trained together from `{hook: [tokens, d_in]}` batches."""

    def __init__(self, d_ins: Mapping[str, int], cfg: SAETrainConfig, *, compile: bool = False) -> None:
        cfg.check()
        self.cfg = cfg
        self.saes = {
            hook: build_sae(cfg.architecture, d_in, cfg.d_sae, k=cfg.k, seed=cfg.seed + i)
            for i, (hook, d_in) in enumerate(d_ins.items())
        }
        self.params = [p for sae in self.saes.values() for p in sae.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr, betas=cfg.adam_betas)
        self.step = 0
        self.tokens_seen = 0
        self.since_fired = {h: torch.zeros(cfg.d_sae, dtype=torch.long) for h in self.saes}
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self._initialised_b_dec = False
        self._loss = torch.compile(self._losses, fullgraph=True, dynamic=True) if compile else self._losses

    def _losses(self, batch: Mapping[str, Tensor], dead: Mapping[str, Tensor], l1_scale: float):
        return {hook: sae_loss(sae, batch[hook], self.cfg, dead[hook], l1_scale) for hook, sae in self.saes.items()}

    def dead_masks(self) -> dict[str, Tensor]:
        return {h: c >= self.cfg.dead_after_tokens for h, c in self.since_fired.items()}

    def train_step(self, batch: Mapping[str, Tensor]) -> dict[str, dict]:
        cfg = self.cfg
        batch = {h: batch[h].float() for h in self.saes}
        distributed = dist.is_available() and dist.is_initialized()
        if not self._initialised_b_dec:  # b_dec starts at the data mean (geometric-median stand-in)
            with torch.no_grad():
                for hook, sae in self.saes.items():
                    mean = batch[hook].mean(0)
                    if distributed:  # every rank starts from the same (global) mean
                        dist.all_reduce(mean)
                        mean /= dist.get_world_size()
                    sae.b_dec.copy_(mean)
            self._initialised_b_dec = True
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(self.step, cfg)
        l1_scale = min(1.0, (self.step + 1) / cfg.l1_warmup_steps) if cfg.l1_warmup_steps else 1.0
        out = self._loss(batch, self.dead_masks(), l1_scale)
        total = sum(o["loss"] for o in out.values())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        fired = {h: (o["features"] > 0).any(0) for h, o in out.items()}
        n_tokens = next(iter(batch.values())).shape[0]
        if distributed:  # what DistributedDataParallel does: average gradients; plus global dead-feature counts
            world = dist.get_world_size()
            for p in self.params:
                dist.all_reduce(p.grad)
                p.grad.div_(world)
            for h in fired:
                f = fired[h].to(torch.int32)
                dist.all_reduce(f, op=dist.ReduceOp.MAX)
                fired[h] = f.bool()
            count = torch.tensor(n_tokens)
            dist.all_reduce(count)
            n_tokens = int(count)
        if cfg.architecture != "standard":
            for sae in self.saes.values():
                _remove_parallel_grad(sae)
        self.optimizer.step()
        for hook, sae in self.saes.items():
            if cfg.architecture != "standard":
                with torch.no_grad():
                    sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
            counter = self.since_fired[hook]
            counter.add_(n_tokens).masked_fill_(fired[hook], 0)
        self.step += 1
        self.tokens_seen += n_tokens
        if cfg.architecture == "standard" and cfg.resample_every and self.step % cfg.resample_every == 0:
            for hook in self.saes:
                self.resample_dead(hook, batch[hook])
        return out

    @torch.no_grad()
    def resample_dead(self, hook: str, x: Tensor) -> int:
        """Re-initialise dead features towards inputs reconstructed worst (sampled by squared error), resetting
        their optimiser state; returns how many were resampled."""
        sae = self.saes[hook]
        dead = (self.since_fired[hook] >= self.cfg.dead_after_tokens).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        err = (sae.decode(sae.encode(x)) - x).square().sum(-1)  # [N]
        picks = torch.multinomial(err + 1e-12, dead.numel(), replacement=True, generator=self.generator)
        directions = x[picks] - sae.b_dec
        directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-8)  # [n_dead, d_in]
        alive = self.since_fired[hook] < self.cfg.dead_after_tokens
        enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        sae.W_dec[dead] = directions
        sae.W_enc[:, dead] = directions.T * enc_norm * 0.2
        sae.b_enc[dead] = 0.0
        for p, index in ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,))):
            state = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][index] = 0.0
        self.since_fired[hook][dead] = 0
        return int(dead.numel())

    # ---- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "config": asdict(self.cfg),
            "saes": {h: s.state_dict() for h, s in self.saes.items()},
            "optimizer": self.optimizer.state_dict(),
            "since_fired": self.since_fired,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "initialised_b_dec": self._initialised_b_dec,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["saes"]) != list(self.saes):
            raise ValueError(f"checkpoint trains hooks {list(state['saes'])}, this run {list(self.saes)}")
        for hook, sae in self.saes.items():
            sae.load_state_dict(state["saes"][hook])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.since_fired = {h: t.clone() for h, t in state["since_fired"].items()}
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self._initialised_b_dec = state["initialised_b_dec"]

    def save_checkpoint(self, directory: Path) -> Path:
        path = Path(directory) / CHECKPOINT_NAME
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(), tmp)
            torch.load(tmp, weights_only=False)  # verify before it replaces the previous checkpoint
        return path


def _remove_parallel_grad(sae: SAE) -> None:
    """Drop the gradient component along each (unit) decoder row, so the step keeps the norm fixed."""
    grad = sae.W_dec.grad
    if grad is None:
        return
    w = sae.W_dec.detach()
    grad.sub_((grad * w).sum(1, keepdim=True) * w)


# ---- entry points ---------------------------------------------------------------------------------------
def train_saes(
    source: Iterable[Mapping[str, Tensor]],
    d_ins: Mapping[str, int],
    cfg: SAETrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    compile: bool = False,
    progress: bool = True,
    evaluate: Callable[[Mapping[str, SAE]], Mapping[str, float]] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train one SAE per hook of `d_ins` (`{hook: d_in}`) for `cfg.total_steps` batches of `source`.

    `evaluate(saes) -> {metric: value}` adds metrics at each metrics step (e.g. `ce_loss_recovered`).
    Writes `checkpoint.pt`, `metrics.json` and, at the end, each SAE in SAELens's format under
    `checkpoint_dir/<hook>/`. `on_step(step)` is called after every step (tests use it to simulate a kill).
    """
    trainer = SAETrainer(d_ins, cfg, compile=compile)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    metrics: list[dict[str, Any]] = []
    if resume:
        if directory is None:
            raise ValueError("resume=True needs checkpoint_dir")
        path = directory / CHECKPOINT_NAME
        if path.exists():
            trainer.load_state_dict(torch.load(path, weights_only=False))
            metrics_path = directory / "metrics.json"
            if metrics_path.exists():
                metrics = [m for m in json.loads(metrics_path.read_text()) if m["step"] <= trainer.step]
    batches = _skip(source, trainer.step)
    is_main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    bar = _progress(cfg.total_steps, trainer.step, progress and is_main)
    start, start_tokens = time.perf_counter(), trainer.tokens_seen
    while trainer.step < cfg.total_steps:
        try:
            batch = next(batches)
        except StopIteration:
            raise ValueError(f"the activation source ran out after {trainer.step} of {cfg.total_steps} steps") from None
        batch = _as_mapping(batch, trainer.saes)
        out = trainer.train_step(batch)
        if trainer.step % cfg.metrics_every == 0 or trainer.step == cfg.total_steps:
            row: dict[str, Any] = {"step": trainer.step, "tokens": trainer.tokens_seen}
            for hook, o in out.items():
                for key, value in reconstruction_metrics(batch[hook].float(), o["x_hat"], o["features"]).items():
                    row[f"{hook}/{key}"] = value
                row[f"{hook}/dead_fraction"] = float(trainer.dead_masks()[hook].float().mean())
                row[f"{hook}/loss"] = float(o["loss"].detach())
            if evaluate is not None:
                row.update(evaluate(trainer.saes))
            metrics.append(row)
            if bar is not None:
                first = next(iter(out))
                bar.set_postfix(ev=f"{row[f'{first}/explained_variance']:.3f}", l0=f"{row[f'{first}/l0']:.1f}")
        if bar is not None:
            bar.update(1)
            elapsed = time.perf_counter() - start
            bar.set_description(f"{(trainer.tokens_seen - start_tokens) / max(elapsed, 1e-9):,.0f} tok/s")
        if directory is not None and is_main and cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0:
            _save_all(trainer, directory, metrics, final=False)
        if on_step is not None:
            on_step(trainer.step)
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    if directory is not None and is_main:
        _save_all(trainer, directory, metrics, final=True)
    for sae in trainer.saes.values():
        sae.eval()
    rate = (trainer.tokens_seen - start_tokens) / max(elapsed, 1e-9)
    return TrainResult(trainer.saes, metrics, rate)


def train_sae(
    source: Iterable[Tensor], d_in: int, cfg: SAETrainConfig, *, hook: str = "sae", **kwargs: Any
) -> TrainResult:
    """`train_saes` for one SAE from `[tokens, d_in]` batches (e.g. `ActivationStore(p).batches(name, 4096)`)."""
    return train_saes(({hook: x} for x in source), {hook: d_in}, cfg, **kwargs)


def _save_all(trainer: SAETrainer, directory: Path, metrics: list, final: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(directory)
    with atomic_path(directory / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    if final:
        for hook, sae in trainer.saes.items():
            save_saelens(sae, directory / hook, hook_name=hook)


def _skip(source: Iterable, n: int) -> Iterator:
    """The source from batch `n` on: `source.skip(n)` when it has one (cheap), else batches read and dropped."""
    if n and hasattr(source, "skip"):
        return iter(source.skip(n))
    return itertools.islice(iter(source), n, None)


def _as_mapping(batch: Any, saes: Mapping[str, SAE]) -> Mapping[str, Tensor]:
    if isinstance(batch, Tensor):
        if len(saes) != 1:
            raise ValueError(f"a bare tensor batch feeds one SAE; this run trains {list(saes)}: yield dicts")
        return {next(iter(saes)): batch}
    missing = [h for h in saes if h not in batch]
    if missing:
        raise ValueError(f"batch has no activations for {missing} (it has {list(batch)})")
    return batch


def _progress(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, leave=False)
