"""Training sparse autoencoders: SAELens's objectives on sparse kernels, exact across ranks, resumable.

`train_saes` trains one SAE per hook from any iterable of `{hook: [tokens, d_in]}` batches (or, for a single
SAE, `train_sae` from `[tokens, d_in]` batches): an `ActivationStore`'s `.batches(hooks, ...)` (one pass feeds
every SAE), tensors in memory, or live activations of a model (`LiveActivations`, several hooks from one forward).

The losses, initialisation, optimiser, learning-rate and L1 schedules, gradient clipping and dead-feature rule
are SAELens's (`SAETrainConfig.from_saelens` converts a SAELens configuration exactly; see sae_objective.py for
the formulas), so its hyper-parameters transfer. Differences, each a choice you can turn off: `b_dec_init="mean"`
(the decoder bias starts at the data mean, so the first reconstructions are not off by the mean; SAELens starts
at zero) and `resample_every` (dead features re-initialised towards badly reconstructed inputs; off by default,
for any architecture: TopK and BatchTopK also have SAELens's auxiliary loss on dead latents).

Under `torchrun` (torch.distributed initialised) each rank feeds its own share of every global batch and the
ranks train one set of SAEs equal to one process on the global batch (see distributed.py): gradients, dead
features, BatchTopK's batch-level top k and threshold, resampling and metrics are global.

Checkpoints (`checkpoint_dir/checkpoint.pt`, every `checkpoint_every` steps and at the end; rank 0 writes) hold
tensors and plain Python values only and are read with `weights_only=True`: SAEs, optimiser, the dead-feature
counters, thresholds, the resampling generator, metrics and the configuration. `resume=True` continues from the
last one after checking that this run's configuration is the checkpoint's (a difference is an error naming the
fields; `override=("lr",)` changes them deliberately), skipping the batches already consumed, so a killed run
ends with the same weights as an uninterrupted one (given a deterministic source).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import pickle
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic import atomic_path, save_torch
from ..compile_cache import CompileCache
from ..compile_policy import SwitchWhenPaid, expected_cost, first_compile
from . import distributed
from .sae import SAE, build_sae
from .sae_objective import Objective, StepResult, compiled_training_step, training_step
from .saelens_format import save_saelens

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "t5hooks-sae-checkpoint"
CHECKPOINT_VERSION = 2
TRAINABLE = ("standard", "topk", "batchtopk")
# run bookkeeping: may change between a checkpoint and its resumption without changing what is trained
BOOKKEEPING_FIELDS = ("metrics_every", "checkpoint_every")
# fields that fix the parameters' shapes or meaning: a checkpoint cannot continue under other values
FIXED_FIELDS = ("architecture", "d_sae", "rescale_acts_by_decoder_norm", "apply_b_dec_to_input")


@dataclass
class SAETrainConfig:
    """Hyper-parameters shared by the SAEs of one run (SAELens's names in comments where they differ)."""

    architecture: str = "topk"  # "standard" | "topk" | "batchtopk"
    d_sae: int = 256
    k: int = 8  # active features per token (topk; batchtopk: on average over the global batch)
    l1_coefficient: float = 1.0  # standard
    l1_warmup_steps: int = 0  # standard: the L1 coefficient ramps from 0 (SAELens: l1_warm_up_steps)
    aux_coefficient: float = 1.0  # topk / batchtopk auxiliary loss (SAELens: aux_loss_coefficient)
    aux_k: int | None = None  # dead latents in the auxiliary loss (default d_in // 2)
    rescale_acts_by_decoder_norm: bool | None = None  # None: True for topk / batchtopk (as SAELens), else False
    apply_b_dec_to_input: bool = True
    decoder_init_norm: float = 0.1  # decoder rows start at this norm (SAELens's heuristic init)
    b_dec_init: str = "mean"  # "mean" (global mean of the first batch) | "zeros" (SAELens)
    threshold_lr: float = 0.01  # batchtopk: EMA rate of the inference threshold (SAELens: topk_threshold_lr)
    lr: float = 3e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0  # per SAE, as SAELens's trainer clips (None: no clipping)
    total_steps: int = 1000
    warmup_steps: int = 0  # linear warm-up (SAELens: lr_warm_up_steps)
    decay_steps: int = 0  # linear decay to 0 over the last decay_steps (SAELens: lr_decay_steps)
    dead_after_tokens: int = 4_096_000  # dead: not fired for more than this many tokens (SAELens: 1000 steps x 4096)
    resample_every: int = 0  # resample dead features every N steps (0 = never; not in SAELens)
    sparse_below: float = 0.2  # standard: sparse kernels below this active fraction (the break-even measured on CPU)
    metrics_every: int = 50
    checkpoint_every: int = 0  # 0 = only at the end
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rescale_acts_by_decoder_norm is None:
            self.rescale_acts_by_decoder_norm = self.architecture != "standard"
        self.adam_betas = tuple(self.adam_betas)

    def check(self) -> None:
        """ValueError naming the first field out of range (every number finite, counts positive, ...)."""
        if self.architecture not in TRAINABLE:
            raise ValueError(f"architecture={self.architecture!r}; trainable: {', '.join(map(repr, TRAINABLE))}")
        positive = ("d_sae", "k", "total_steps", "metrics_every", "dead_after_tokens")
        nonnegative = ("l1_warmup_steps", "warmup_steps", "decay_steps", "resample_every", "checkpoint_every")
        for name in positive + nonnegative:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name in positive else 0):
                raise ValueError(f"{name} must be an integer >= {1 if name in positive else 0}, got {value!r}")
        if self.architecture != "standard" and self.k > self.d_sae:
            raise ValueError(f"k={self.k} must not exceed d_sae={self.d_sae}")
        if self.aux_k is not None and (not isinstance(self.aux_k, int) or self.aux_k < 1):
            raise ValueError(f"aux_k must be None or an integer >= 1, got {self.aux_k!r}")
        for name, low, high, closed in (
            ("l1_coefficient", 0.0, math.inf, True),
            ("aux_coefficient", 0.0, math.inf, True),
            ("lr", 0.0, math.inf, False),
            ("decoder_init_norm", 0.0, math.inf, False),
            ("threshold_lr", 0.0, 1.0, True),
            ("sparse_below", 0.0, 1.0, True),
        ):
            _check_number(name, getattr(self, name), low, high, closed)
        if self.max_grad_norm is not None:
            _check_number("max_grad_norm", self.max_grad_norm, 0.0, math.inf, False)
        if len(self.adam_betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        if self.b_dec_init not in ("mean", "zeros"):
            raise ValueError(f"b_dec_init={self.b_dec_init!r}; valid: 'mean', 'zeros'")
        if self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps + decay_steps ({self.warmup_steps} + {self.decay_steps}) must not exceed "
                f"total_steps={self.total_steps}"
            )
        if self.architecture == "standard" and self.rescale_acts_by_decoder_norm:
            raise ValueError("rescale_acts_by_decoder_norm is for topk/batchtopk (the ReLU SAE's L1 uses the norms)")

    @classmethod
    def from_saelens(cls, sae_cfg: Any, trainer_cfg: Any, **changes: Any) -> SAETrainConfig:
        """The configuration that trains as SAELens would with its training-SAE config (`StandardTrainingSAEConfig`,
        `TopKTrainingSAEConfig`, `BatchTopKTrainingSAEConfig` or their `to_dict()`) and its `SAETrainerConfig`
        (or a `LanguageModelSAERunnerConfig`'s, or a dict): the same losses, initialisation, schedules, clipping
        and dead-feature window (steps x batch size -> tokens); `b_dec_init="zeros"`. Settings SAELens has and
        this trainer does not (activation normalisation, Lp norms other than 1, cosine schedules, autocast)
        are an error naming them. `changes` then override fields (e.g. `metrics_every`)."""
        s = sae_cfg.to_dict() if hasattr(sae_cfg, "to_dict") else dict(sae_cfg)
        t = asdict(trainer_cfg) if hasattr(trainer_cfg, "__dataclass_fields__") else dict(trainer_cfg)
        if "total_training_samples" not in t and "total_training_tokens" in t:  # a runner config's names
            t["total_training_samples"] = t["total_training_tokens"]
            t["train_batch_size_samples"] = t["train_batch_size_tokens"]
        architecture = s.get("architecture")
        unsupported = []
        if architecture not in TRAINABLE:
            unsupported.append(f"architecture={architecture!r}")
        if (s.get("normalize_activations") or "none") != "none":
            unsupported.append(f"normalize_activations={s['normalize_activations']!r}")
        if (s.get("reshape_activations") or "none") != "none":
            unsupported.append(f"reshape_activations={s['reshape_activations']!r}")
        if s.get("lp_norm", 1.0) != 1.0:
            unsupported.append(f"lp_norm={s['lp_norm']!r}")
        if (t.get("lr_scheduler_name") or "constant").lower() != "constant":
            unsupported.append(f"lr_scheduler_name={t['lr_scheduler_name']!r}")
        if t.get("autocast"):
            unsupported.append("autocast=True")
        k = s.get("k", 8)
        if architecture in ("topk", "batchtopk") and k != int(k):
            unsupported.append(f"k={k!r} (not an integer)")
        if unsupported:
            raise ValueError(f"SAELens settings this trainer does not implement: {', '.join(unsupported)}")
        batch = int(t["train_batch_size_samples"])
        values: dict[str, Any] = dict(
            architecture=architecture,
            d_sae=int(s["d_sae"]),
            k=int(k),
            l1_coefficient=float(s.get("l1_coefficient", 1.0)),
            l1_warmup_steps=int(s.get("l1_warm_up_steps", 0)),
            aux_coefficient=float(s.get("aux_loss_coefficient", 1.0)),
            rescale_acts_by_decoder_norm=bool(s.get("rescale_acts_by_decoder_norm", False))
            and architecture != "standard",
            apply_b_dec_to_input=bool(s.get("apply_b_dec_to_input", True)),
            decoder_init_norm=float(s.get("decoder_init_norm") or 1.0),
            b_dec_init="zeros",
            threshold_lr=float(s.get("topk_threshold_lr", 0.01)),
            lr=float(t.get("lr", 3e-4)),
            adam_betas=(float(t.get("adam_beta1", 0.9)), float(t.get("adam_beta2", 0.999))),
            max_grad_norm=1.0,
            total_steps=int(t["total_training_samples"]) // batch,
            warmup_steps=int(t.get("lr_warm_up_steps", 0)),
            decay_steps=int(t.get("lr_decay_steps", 0)),
            dead_after_tokens=int(t.get("dead_feature_window", 1000)) * batch,
        )
        values.update(changes)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (what checkpoints and metrics record)."""
        return json.loads(json.dumps(asdict(self)))


def _check_number(name: str, value: Any, low: float, high: float, closed: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low <= value if closed else low < value) and value <= high
    if not ok:
        bound = f"{'>=' if closed else '>'} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


@dataclass
class TrainResult:
    saes: dict[str, SAE]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    tokens_per_second: float = 0.0  # global rows (of the first hook) per second, over all ranks


def lr_factor(step: int, cfg: SAETrainConfig) -> float:
    """Linear warm-up from `1/warmup_steps`, constant, linear decay to 0 over the last `decay_steps`
    (SAELens's "constant" schedule with warm-up and decay)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = cfg.total_steps - cfg.decay_steps
    if cfg.decay_steps and step >= decay_start:
        return max(0.0, (cfg.total_steps - step) / cfg.decay_steps)
    return 1.0


def l1_factor(step: int, cfg: SAETrainConfig) -> float:
    """The L1 coefficient's warm-up: 0 at step 0, then linear to 1 at `l1_warmup_steps` (SAELens's scheduler)."""
    return min(1.0, step / cfg.l1_warmup_steps) if cfg.l1_warmup_steps else 1.0


# ---- the trainer ----------------------------------------------------------------------------------------
class SAETrainer:
    """One SAE per hook, one optimiser, trained together from `{hook: [tokens, d_in]}` batches.

    `device`: where the SAEs train (None: the device of the first batch). `compile`: run each SAE's loss as a
    `torch.compile(fullgraph=True)` graph of `compiled_training_step` (the eager sparse kernels with static shapes
    for TopK / BatchTopK, the dense formulation for the ReLU SAE). The graphs last the whole run (the L1 warm-up,
    the dead-feature masks and the global token count are tensor inputs; TopK / BatchTopK compile a second graph
    when features first die). None (the default): run eagerly, time the steps, and compile once the steps left
    at the measured speed would save more than compiling is expected to cost (`compile_policy`; on CPU the
    compiled step is 0.93-1.27x the eager one and compiles in seconds, so only long runs compile; every rank
    switches at the same step; batchtopk under torchrun stays eager). True: compiled from the first step
    (inductor; a string names the backend); False: never. Compiles are announced and warm-started from the
    compile cache (`compile_cache`)."""

    def __init__(
        self,
        d_ins: Mapping[str, int],
        cfg: SAETrainConfig,
        *,
        device: torch.device | str | None = None,
        compile: bool | str | None = None,
    ) -> None:
        cfg.check()
        if not d_ins:
            raise ValueError("d_ins is empty: give {hook: d_in} for at least one SAE")
        self.cfg = cfg
        self.d_ins = {h: int(d) for h, d in d_ins.items()}
        self.device = torch.device(device) if device is not None else None
        self.saes: dict[str, SAE] = {}
        for i, (hook, d_in) in enumerate(self.d_ins.items()):
            sae = build_sae(
                cfg.architecture,
                d_in,
                cfg.d_sae,
                k=cfg.k,
                apply_b_dec_to_input=cfg.apply_b_dec_to_input,
                rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm,
            )
            sae.reset_parameters(seed=cfg.seed + i, decoder_norm=cfg.decoder_init_norm)
            self.saes[hook] = sae.train()
        self.params = [p for sae in self.saes.values() for p in sae.parameters() if p.requires_grad]
        distributed.broadcast_parameters(self.params)
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr, betas=tuple(cfg.adam_betas))
        self.step = 0
        self.tokens_seen = 0
        m = cfg.d_sae
        self.since_fired = {h: torch.zeros(m, dtype=torch.long) for h in self.saes}
        self.threshold = {h: torch.zeros((), dtype=torch.float64) for h in self.saes}  # batchtopk, as SAELens
        self.density = {h: 1.0 for h in self.saes}  # last step's global fraction of active (token, feature) pairs
        self.resampled = {h: 0 for h in self.saes}  # features resampled so far
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.b_dec_initialised = cfg.b_dec_init == "zeros"
        self.metrics: list[dict[str, Any]] = []
        self.data: dict[str, Any] = {}  # what feeds the run (train_saes's `data`), checked on resume
        self.backend = compile if isinstance(compile, str) else "inductor"
        self.compiling = bool(compile)  # the steps run compiled (from the start, or since the switch)
        self._compiled: dict[str, Callable] = {}
        self._compiled_variants: set[tuple[str, bool]] = set()  # (hook, any_dead) graphs compiled so far
        self._compiled_this_step = False
        global_batchtopk = cfg.architecture == "batchtopk" and distributed.active()
        self.auto_compile = compile is None and not global_batchtopk
        self.switch: SwitchWhenPaid | None = None  # compile=None: decides when compiling pays (set at the 1st step)
        if compile and global_batchtopk:
            raise ValueError("compile=True with batchtopk under torchrun is not supported (the global top k runs "
                             "between ranks): train eagerly")  # fmt: skip
        if self.device is not None:
            self.to(self.device)

    # ---- devices ----------------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> SAETrainer:
        """Move the SAEs, optimiser state and counters (parameters keep their identity)."""
        device = torch.device(device)
        with torch.no_grad():
            for sae in self.saes.values():
                for t in itertools.chain(sae.parameters(), sae.buffers()):
                    t.data = t.data.to(device)
            for state in self.optimizer.state.values():
                for key, value in state.items():
                    if isinstance(value, Tensor) and key != "step":
                        state[key] = value.to(device)
        self.since_fired = {h: c.to(device) for h, c in self.since_fired.items()}
        self.device = device
        return self

    # ---- one step ---------------------------------------------------------------------------------------
    def dead_masks(self) -> dict[str, Tensor]:
        return {h: c > self.cfg.dead_after_tokens for h, c in self.since_fired.items()}

    def train_step(self, batch: Mapping[str, Tensor]) -> dict[str, StepResult]:
        cfg = self.cfg
        start = time.perf_counter()
        self._compiled_this_step = False
        if self.device is None:
            self.to(next(iter(batch.values())).device)
        if self.auto_compile and self.switch is None:  # the device is known now: its cost defaults apply
            hook = next(iter(self.saes))
            entry = self._cache_entry(hook, any_dead=False)
            self.switch = SwitchWhenPaid(expected_cost(entry, self.device.type, True, work="sae"), record=entry)
        xs = {h: _rows(batch[h], self.d_ins[h]).to(self.device, torch.float32) for h in self.saes}
        n_global = self._global_counts(xs)
        if not self.b_dec_initialised:
            self._init_b_dec(xs, n_global)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(self.step, cfg)
        dead = self.dead_masks()
        results = {}
        for hook, sae in self.saes.items():
            results[hook] = self._objective(hook, sae, xs[hook], dead[hook], n_global[hook])
        total = sum(r.loss for r in results.values())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        distributed.sum_gradients(self.params)
        if cfg.max_grad_norm is not None:
            for sae in self.saes.values():
                torch.nn.utils.clip_grad_norm_([p for p in sae.parameters() if p.requires_grad], cfg.max_grad_norm)
        self.optimizer.step()
        self._update_counters(results, n_global)  # (reads the fired counts: the step has run, also on CUDA)
        self.step += 1
        if self.switch is not None:
            self._time_step(time.perf_counter() - start)
        self.tokens_seen += n_global[next(iter(self.saes))]
        if cfg.resample_every and self.step % cfg.resample_every == 0:
            for hook in self.saes:
                self.resample_dead(hook, xs[hook])
        self._last = (xs, results, n_global)
        return results

    def _time_step(self, seconds: float) -> None:
        """compile=None: eager steps decide when to switch (every rank at the same step); compiled steps record
        their measured speed-up for the next run's decision."""
        assert self.switch is not None
        if self.compiling:
            if not self._compiled_this_step:  # (a later variant's compile is not a step's speed)
                self.switch.observe_compiled(seconds, 1)
            return
        self.switch.observe(seconds, 1)
        pays = self.switch.should_compile(remaining_work=self.cfg.total_steps - self.step)
        self.compiling = distributed.any_rank(pays, self.device)

    def _objective(self, hook: str, sae: SAE, x: Tensor, dead: Tensor, n_global: int) -> StepResult:
        cfg = self.cfg
        l1 = cfg.l1_coefficient * l1_factor(self.step, cfg)
        if not self.compiling:
            obj = Objective(cfg.architecture, cfg.k, l1, cfg.aux_coefficient, cfg.aux_k, cfg.sparse_below)
            return training_step(sae, x, obj, dead, n_global, density=self.density[hook])
        if hook not in self._compiled:
            self._compiled[hook] = torch.compile(compiled_training_step, fullgraph=True, backend=self.backend)
        any_dead = cfg.architecture != "standard" and cfg.aux_coefficient != 0 and bool(dead.any())
        constants = dict(architecture=cfg.architecture, k=cfg.k, aux_k=cfg.aux_k or sae.d_in // 2, any_dead=any_dead)
        scalars = torch.tensor([l1, cfg.aux_coefficient, float(n_global)], dtype=torch.float32, device=x.device)
        first = (hook, any_dead) not in self._compiled_variants
        with self._first_compile(hook, any_dead) if first else contextlib.nullcontext():
            loss, x_hat, fired, threshold = self._compiled[hook](sae, x, dead, scalars, **constants)
        self._compiled_variants.add((hook, any_dead))
        self._compiled_this_step |= first
        if threshold is not None:
            threshold = distributed.all_reduce_min(threshold.reshape(1))[0]
        return StepResult(loss, x_hat, fired, int(fired.sum()), threshold)

    def _cache_entry(self, hook: str, any_dead: bool) -> CompileCache:
        """The compile-cache entry of one SAE's compiled step (what its code depends on besides torch and the
        machine): its shapes and architecture, and whether the auxiliary loss runs."""
        sae, cfg = self.saes[hook], self.cfg
        key = {"what": "SAE training step", "architecture": cfg.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae,
               "k": cfg.k, "aux_k": cfg.aux_k or sae.d_in // 2, "aux_loss": any_dead,
               "rescale": sae.rescale_acts_by_decoder_norm, "b_dec_to_input": sae.apply_b_dec_to_input,
               "dtype": str(sae.W_enc.dtype), "device": sae.W_enc.device.type, "backend": self.backend}  # fmt: skip
        return CompileCache(key)

    def _first_compile(self, hook: str, any_dead: bool) -> contextlib.AbstractContextManager:
        entry = self._cache_entry(hook, any_dead)
        what = f"the SAE training step for {hook} ({self.cfg.architecture}{', auxiliary loss' if any_dead else ''})"
        cost = expected_cost(entry, self.saes[hook].W_enc.device.type, True, work="sae")
        return first_compile(what, entry, cost, show=distributed.is_main())

    def _global_counts(self, xs: Mapping[str, Tensor]) -> dict[str, int]:
        counts = torch.tensor([x.shape[0] for x in xs.values()], dtype=torch.long, device=self.device)
        counts = distributed.all_reduce_sum(counts).tolist()
        if min(counts) < 1:
            raise ValueError(f"an empty batch for {[h for h, c in zip(xs, counts) if c < 1]}")
        return dict(zip(xs, counts))

    @torch.no_grad()
    def _init_b_dec(self, xs: Mapping[str, Tensor], n_global: Mapping[str, int]) -> None:
        """b_dec <- the global mean of the first batch (every rank starts from the same value)."""
        sums = distributed.all_reduce_sum(torch.cat([x.double().sum(0) for x in xs.values()]))
        offset = 0
        for hook, sae in self.saes.items():
            d = self.d_ins[hook]
            sae.b_dec.copy_((sums[offset : offset + d] / n_global[hook]).to(sae.b_dec.dtype))
            offset += d
        self.b_dec_initialised = True

    @torch.no_grad()
    def _update_counters(self, results: Mapping[str, StepResult], n_global: Mapping[str, int]) -> None:
        """Global dead-feature counters and densities (one all-reduce); BatchTopK's threshold EMA."""
        fired = distributed.all_reduce_sum(torch.cat([r.fired.to(self.device, torch.long) for r in results.values()]))
        m = self.cfg.d_sae
        for i, hook in enumerate(self.saes):
            f = fired[i * m : (i + 1) * m]
            self.since_fired[hook].add_(n_global[hook]).masked_fill_(f > 0, 0)
            self.density[hook] = float(f.sum()) / (n_global[hook] * m)
            r = results[hook]
            if r.batch_threshold is not None and math.isfinite(float(r.batch_threshold)):
                lr = self.cfg.threshold_lr
                self.threshold[hook] = (1 - lr) * self.threshold[hook] + lr * r.batch_threshold.double().cpu()
                self.saes[hook].threshold.fill_(float(self.threshold[hook]))

    @torch.no_grad()
    def resample_dead(self, hook: str, x: Tensor) -> int:
        """Re-initialise dead features towards the global batch's worst-reconstructed inputs (sampled by squared
        error with the run's generator: identical on every rank), resetting their optimiser state; returns how
        many were resampled."""
        sae = self.saes[hook]
        dead_mask = self.dead_masks()[hook]
        dead = dead_mask.nonzero().flatten()
        if dead.numel() == 0:
            return 0
        x = distributed.gather_rows(x)  # [global N, d_in], rank order: the one-process batch
        err = (sae.decode(sae.encode(x)) - x).square().sum(-1)  # [N]
        picks = torch.multinomial(err.double().cpu() + 1e-12, dead.numel(), replacement=True, generator=self.generator)
        directions = x[picks.to(x.device)] - sae.b_dec
        directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-8)  # [n_dead, d_in]
        alive = ~dead_mask
        enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0, device=x.device)
        sae.W_dec[dead] = directions
        sae.W_enc[:, dead] = directions.T * enc_norm * 0.2
        sae.b_enc[dead] = 0.0
        for p, index in ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,))):
            state = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][index] = 0.0
        self.since_fired[hook][dead] = 0
        self.resampled[hook] += int(dead.numel())
        return int(dead.numel())

    # ---- metrics ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def metrics_row(self) -> dict[str, Any]:
        """Explained variance, L0, MSE, loss and dead fraction of the last step, over the global batch."""
        xs, results, n_global = self._last
        parts = []
        for hook, x in xs.items():
            r = results[hook]
            resid = (x - r.x_hat).double()
            x64 = x.double()
            head = torch.stack([resid.square().sum(), x64.square().sum(), x.new_tensor(r.active).double(),
                                r.loss.detach().double()])  # fmt: skip
            parts += [head, x64.sum(0)]
        total = distributed.all_reduce_sum(torch.cat(parts)).cpu()
        row: dict[str, Any] = {"step": self.step, "tokens": self.tokens_seen}
        offset = 0
        dead = self.dead_masks()
        for hook, x in xs.items():
            resid2, x2, active, loss = total[offset : offset + 4].tolist()
            sum_x = total[offset + 4 : offset + 4 + x.shape[1]]
            offset += 4 + x.shape[1]
            n = n_global[hook]
            variance = max(x2 - float(sum_x.square().sum()) / n, 1e-12)
            row[f"{hook}/explained_variance"] = 1 - resid2 / variance
            row[f"{hook}/l0"] = active / n
            row[f"{hook}/mse"] = resid2 / n
            row[f"{hook}/loss"] = loss
            row[f"{hook}/dead_fraction"] = float(dead[hook].float().mean())
            if self.cfg.resample_every:
                row[f"{hook}/resampled"] = self.resampled[hook]
        return row

    # ---- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain Python values only (loadable with `weights_only=True`)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "config": self.cfg.to_dict(),
            "d_ins": dict(self.d_ins),
            "saes": {h: {k: v.detach().cpu() for k, v in s.state_dict().items()} for h, s in self.saes.items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "since_fired": {h: c.cpu() for h, c in self.since_fired.items()},
            "threshold": {h: t.clone() for h, t in self.threshold.items()},
            "density": dict(self.density),
            "resampled": dict(self.resampled),
            "generator": self.generator.get_state(),
            "b_dec_initialised": self.b_dec_initialised,
            "metrics": [dict(m) for m in self.metrics],
            "data": dict(self.data),
        }

    def load_state_dict(
        self, state: Mapping[str, Any], *, override: Sequence[str] = (), source: str = "checkpoint"
    ) -> None:
        """Continue from `state`; its configuration must equal this run's except the `override` fields
        (ValueError naming every difference otherwise)."""
        if dict(state["d_ins"]) != self.d_ins:
            raise ValueError(
                f"{source} trains SAEs for {dict(state['d_ins'])} ({{hook: d_in}}); this run for {self.d_ins}"
            )
        check_resume_config(state["config"], self.cfg.to_dict(), override, source, strict_keys=False)
        check_resume_config(state["data"], self.data, override, f"{source} (its data)", strict_keys=False)
        for hook, sae in self.saes.items():
            sae.load_state_dict(state["saes"][hook])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # this run's (possibly overridden) optimiser settings
            group["betas"] = tuple(self.cfg.adam_betas)
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.since_fired = {h: t.clone() for h, t in state["since_fired"].items()}
        self.threshold = {h: t.clone() for h, t in state["threshold"].items()}
        self.density = {h: float(v) for h, v in state["density"].items()}
        self.resampled = {h: int(v) for h, v in state["resampled"].items()}
        self.generator.set_state(state["generator"])
        self.b_dec_initialised = bool(state["b_dec_initialised"])
        self.metrics = [dict(m) for m in state["metrics"]]
        if self.device is not None:
            self.to(self.device)

    def save_checkpoint(self, directory: str | Path) -> Path:
        path = Path(directory) / CHECKPOINT_NAME
        with atomic_path(path) as tmp:
            save_torch(self.state_dict(), tmp)
            load_checkpoint(tmp)  # verify (weights_only) before it replaces the previous checkpoint
        return path

    def finish(self) -> dict[str, SAE]:
        """The trained SAEs for inference: eval mode, SAELens's decoder-norm rescaling folded in."""
        for sae in self.saes.values():
            if sae.rescale_acts_by_decoder_norm:
                sae.fold_decoder_norm()
            sae.eval()
        return self.saes


def check_resume_config(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    override: Sequence[str],
    source: str = "checkpoint",
    *,
    strict_keys: bool = True,
) -> None:
    """ValueError listing every field where `saved` and `current` differ, unless named in `override`
    (bookkeeping fields excepted); fields that fix the parameters' shapes cannot be overridden.
    `strict_keys=False`: `override` may name fields `current` does not have (they belong to another check)."""
    unknown = [name for name in override if name not in current] if strict_keys else []
    if unknown:
        raise ValueError(f"override {unknown}: not configuration fields; valid: {', '.join(current)}")
    diffs, fixed = [], []
    for name in current:
        old, new = saved.get(name, "<absent>"), current[name]
        if old == new or name in BOOKKEEPING_FIELDS:
            continue
        if name in FIXED_FIELDS:
            fixed.append(f"{name}: {old!r} -> {new!r}")
        elif name not in override:
            diffs.append(f"{name}: {source} has {old!r}, this run {new!r}")
    if fixed:
        raise ValueError(f"{source} cannot continue with a different {'; '.join(fixed)} (start a new run)")
    if diffs:
        names = ",".join(d.split(":")[0] for d in diffs)
        raise ValueError(
            f"this run differs from {source}: {'; '.join(diffs)} "
            f"(to change them deliberately: override={names!r} / --override {names.replace(',', ' ')})"
        )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A trainer checkpoint, read with `weights_only=True` (tensors and plain values; nothing in it can run
    code). A file that needs more, or is not a t5hooks SAE checkpoint, is a one-line ValueError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"WeightsUnpickler error:\s*(.*?)(?: was not an allowed global|\n\n|$)", str(err), re.S)
        why = " ".join((found.group(1) if found else "").split())[:200]
        raise ValueError(
            f"{path}: refused: it holds Python objects beyond tensors and plain values (loading it could run "
            f"code); t5hooks checkpoints never do ({why or 'the safe unpickler rejected it'})"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable checkpoint ({str(err).strip().splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a t5hooks SAE training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')}; this t5hooks reads {CHECKPOINT_VERSION}")
    return state


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def _rows(x: Tensor, d_in: int) -> Tensor:
    """`[N, d_in]` (or `[N, *shape]` with prod(shape) == d_in, e.g. `hook_z`'s `[N, heads, d_head]`)."""
    rows = x.reshape(x.shape[0], -1) if x.dim() > 2 else x
    if rows.dim() != 2 or rows.shape[1] != d_in:
        raise ValueError(f"a batch of shape {tuple(x.shape)} does not hold rows of d_in={d_in}")
    return rows


# ---- entry points ---------------------------------------------------------------------------------------
def train_saes(
    source: Iterable[Mapping[str, Tensor]],
    d_ins: Mapping[str, int],
    cfg: SAETrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    override: Sequence[str] = (),
    device: torch.device | str | None = None,
    compile: bool | str | None = None,
    progress: bool = True,
    evaluate: Callable[[Mapping[str, SAE]], Mapping[str, float]] | None = None,
    data: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train one SAE per hook of `d_ins` (`{hook: d_in}`) for `cfg.total_steps` batches of `source`.

    `evaluate(saes) -> {metric: value}` adds metrics at each metrics step (e.g. `ce_loss_recovered`; under
    torchrun every rank calls it). Rank 0 writes `checkpoint.pt`, `metrics.json` and, at the end, each SAE in
    SAELens's format under `checkpoint_dir/<hook>/`. `resume`: continue from `checkpoint_dir/checkpoint.pt` if
    present (`override`: configuration fields allowed to differ from it). `data`: a JSON-able description of
    what feeds the run (source, batch size, ranks, seed): kept in the checkpoint and, on resume, checked like
    the configuration (a resumed run skips the batches already consumed, so it must read the same data).
    """
    trainer = SAETrainer(d_ins, cfg, device=device, compile=compile)
    trainer.data = json.loads(json.dumps(dict(data or {})))
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume:
        if directory is None:
            raise ValueError("resume=True needs checkpoint_dir")
        known = {*cfg.to_dict(), *trainer.data}
        unknown = [name for name in override if name not in known]
        if unknown:
            raise ValueError(f"override {unknown}: not configuration or data fields; valid: {', '.join(known)}")
        path = directory / CHECKPOINT_NAME
        if path.exists():
            trainer.load_state_dict(load_checkpoint(path), override=override, source=str(path))
    elif override:
        raise ValueError("override applies when resuming (resume=True)")
    batches = _skip(source, trainer.step)
    is_main = distributed.is_main()
    bar = _progress(cfg.total_steps, trainer.step, progress and is_main)
    start, start_tokens = time.perf_counter(), trainer.tokens_seen
    try:  # the bar is cleared whatever happens, so an error message starts on a line of its own
        while trainer.step < cfg.total_steps:
            try:
                batch = next(batches)
            except StopIteration:
                raise ValueError(
                    f"the activation source ran out after {trainer.step} of {cfg.total_steps} steps"
                ) from None
            trainer.train_step(_as_mapping(batch, trainer.saes))
            if trainer.step % cfg.metrics_every == 0 or trainer.step == cfg.total_steps:
                row = trainer.metrics_row()
                if evaluate is not None:
                    row.update(evaluate(trainer.saes))
                trainer.metrics.append(row)
                if bar is not None:
                    first = next(iter(trainer.saes))
                    bar.set_postfix(ev=f"{row[f'{first}/explained_variance']:.3f}", l0=f"{row[f'{first}/l0']:.1f}")
            if bar is not None:
                bar.update(1)
                elapsed = time.perf_counter() - start
                bar.set_description(f"{(trainer.tokens_seen - start_tokens) / max(elapsed, 1e-9):,.0f} tok/s")
            if directory is not None and is_main and cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0:
                _save_checkpoint_and_metrics(trainer, directory)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start
    if directory is not None and is_main:
        _save_checkpoint_and_metrics(trainer, directory)
    saes = trainer.finish()
    if directory is not None and is_main:
        for hook, sae in saes.items():
            save_saelens(sae, directory / hook, hook_name=hook)
    rate = (trainer.tokens_seen - start_tokens) / max(elapsed, 1e-9)
    return TrainResult(saes, list(trainer.metrics), rate)


def train_sae(
    source: Iterable[Tensor], d_in: int, cfg: SAETrainConfig, *, hook: str = "sae", **kwargs: Any
) -> TrainResult:
    """`train_saes` for one SAE from `[tokens, d_in]` batches (e.g. `ActivationStore(p).batches(name, 4096)`)."""
    return train_saes(_SingleHook(source, hook), {hook: d_in}, cfg, **kwargs)


class _SingleHook:
    """`{hook: x}` for each `x` of a source, keeping the source's cheap `skip` (resume) when it has one."""

    def __init__(self, source: Iterable[Tensor], hook: str) -> None:
        self.source, self.hook = source, hook

    def skip(self, n: int) -> Iterator[dict[str, Tensor]]:
        return ({self.hook: x} for x in _skip(self.source, n))

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return ({self.hook: x} for x in self.source)


def _save_checkpoint_and_metrics(trainer: SAETrainer, directory: Path) -> None:
    """The checkpoint (which holds the metrics: it alone decides what a resumed run has done), then
    `metrics.json`, a readable copy of them."""
    directory.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(directory)
    with atomic_path(directory / "metrics.json") as tmp:
        tmp.write_text(json.dumps(trainer.metrics, indent=1))


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


__all__ = [
    "SAETrainConfig",
    "SAETrainer",
    "TrainResult",
    "check_resume_config",
    "load_checkpoint",
    "lr_factor",
    "train_sae",
    "train_saes",
]
