"""Live activations for training: several hooks from one (compiled) capture forward, padding dropped; and the
CE-loss-recovered metric of SAEs spliced into the model.

A token batch is a dict with `input` `[B,E]` and any of `decoder_input`, `one_zero_attention_mask`,
`decoder_attention_mask`, `labels` (the capture module's arguments).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..capture import CaptureModule, compile_capture
from ..compile_policy import SwitchWhenPaid
from . import distributed

TokenBatch = Mapping[str, Tensor]


class LiveActivations:
    """Iterable of `{hook: [n_real_tokens, d]}` from one forward per token batch (no disk).

    `compile`: None (the default) runs the capture eagerly, times its batches and switches to the compiled
    capture (`compile_capture`: regional, warm-started, announced) once the eager time spent, times the saving
    a compiled forward is expected to bring, repays the compile (`compile_policy`'s rule for work of unknown
    length; every rank switches at the same batch); True compiles from the first batch (inductor; a string
    names the `torch.compile` backend), False never. `skip(n)` drops the first n token batches without running
    the model (resuming a killed training run).
    """

    def __init__(
        self,
        model: nn.Module,
        hooks: Sequence[str],
        token_batches: Iterable[TokenBatch],
        *,
        compile: bool | str | None = None,
    ) -> None:
        self.hooks = list(model.resolve_names(list(hooks)))
        self.capture = CaptureModule(model, self.hooks).eval()
        self.forward: Callable[..., dict[str, Tensor]] = self.capture
        self.switch: SwitchWhenPaid | None = None
        self.device = next(model.parameters()).device
        if compile is not False:
            backend = compile if isinstance(compile, str) else "inductor"
            self.compiled = compile_capture(self.capture, backend=backend, announce=distributed.is_main())
            if compile is None:
                cost, entry = self.compiled.expected_cost("inference"), self.compiled.cache_entry("inference")
                self.switch = SwitchWhenPaid(cost, record=entry)
            else:
                self.forward = self.compiled
        self.token_batches = token_batches
        self._skip = 0

    def skip(self, n: int) -> LiveActivations:
        self._skip = n
        return self

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        batches = iter(self.token_batches)
        for _ in range(self._skip):
            next(batches)
        for batch in batches:
            yield self.activations(batch)

    @torch.no_grad()
    def activations(self, batch: TokenBatch) -> dict[str, Tensor]:
        start = time.perf_counter()
        out = self.forward(**batch)
        if self.switch is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._time_batch(time.perf_counter() - start, batch["input"].numel())
        enc_mask, dec_mask = batch.get("one_zero_attention_mask"), batch.get("decoder_attention_mask")
        if dec_mask is None and batch.get("labels") is not None:
            dec_mask = (batch["labels"] != -100).long()
        result = {}
        for hook in self.hooks:
            acts = out[hook]  # [B, pos, d]
            mask = enc_mask if self.capture.model.layout.token_stream(hook) == "encoder" else dec_mask
            result[hook] = acts[mask.bool()] if mask is not None else acts.reshape(-1, acts.shape[-1])
        return result

    def _time_batch(self, seconds: float, tokens: int) -> None:
        """compile=None: eager batches decide when to switch; compiled ones record their measured speed-up."""
        assert self.switch is not None
        if self.forward is self.compiled:
            self.switch.observe_compiled(seconds, tokens)
            return
        self.switch.observe(seconds, tokens)
        if distributed.any_rank(self.switch.should_compile(None), self.device):
            self.forward = self.compiled


@torch.no_grad()
def ce_loss_recovered(model: nn.Module, saes: Mapping[str, nn.Module], batch: TokenBatch) -> dict[str, float]:
    """Per hook: `(L_zero - L_sae) / (L_zero - L_clean)` with the SAE spliced in (no error term) against the
    clean loss and the loss with that activation zeroed; 1 = the SAE loses nothing. Needs `labels`."""
    if batch.get("labels") is None:
        raise ValueError("ce_loss_recovered needs a token batch with labels")
    clean = float(CaptureModule(model, [])(**batch)["loss"])
    scores = {}
    for hook, sae in saes.items():
        was_training, had_error = sae.training, getattr(sae, "use_error_term", False)
        sae.eval()
        sae.use_error_term = False
        try:
            spliced = float(CaptureModule(model, [], intervene={hook: sae})(**batch)["loss"])
        finally:
            sae.train(was_training)
            sae.use_error_term = had_error
        zero = float(CaptureModule(model, [], intervene={hook: _Zero()})(**batch)["loss"])
        scores[f"{hook}/ce_loss_recovered"] = (zero - spliced) / (zero - clean) if zero != clean else float("nan")
        scores[f"{hook}/ce_loss_spliced"] = spliced
    scores["ce_loss_clean"] = clean
    return scores


class _Zero(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)
