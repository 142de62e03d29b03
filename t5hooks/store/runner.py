"""The capture runner of `extract`: one padded batch through the chosen backend (compiled or eager capture module,
the encoder stack alone when only encoder hooks are asked for, or an exported ONNX graph in ONNX Runtime)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


@dataclass
class Encoded:
    """One prompt, tokenised: its index in the source, its tokens and (teacher forcing) its decoder input."""

    doc: int
    tokens: list[int]
    decoder_tokens: list[int] | None


def needs_decoder(model: Any, axes: dict[str, str], src: Any) -> bool:
    """A decoder input is built only when a decoder hook is asked for or the source has decoder targets;
    an encoder-decoder otherwise runs its default one-token decoder (encoder-only models run none)."""
    has_decoder = getattr(model.cfg, "n_decoder_layers", 0) > 0 and hasattr(model, "decode")
    return has_decoder and ("decoder" in axes.values() or src.has_decoder)


def encoder_stack_only(model: Any, names: list[str]) -> bool:
    layout = getattr(model, "layout", None)
    return layout is not None and all(layout.spec(name).stack == "encoder" for name in names)


def probe_shapes(model: Any, names: list[str], axes: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Per-token shape of every hook from one tiny eager forward (E=3, D=2); checks the token axis too."""
    device = next(model.parameters()).device
    cap = model.capture(names)
    tokens = torch.ones(1, 3, dtype=torch.long, device=device)
    every = torch.ones_like(tokens)  # the masks are given: a library call never triggers the user's pad warning
    with torch.inference_mode():
        if getattr(model.cfg, "n_decoder_layers", 0) > 0 and hasattr(model, "decode"):
            dec = torch.zeros(1, 2, dtype=torch.long, device=device)
            out = cap(tokens, dec, every, torch.ones_like(dec))
        else:
            out = cap(tokens, every)
    expected = {"encoder": 3, "decoder": 2}
    shapes = {}
    for name in names:
        shape = tuple(out[name].shape)
        if len(shape) < 2 or shape[0] != 1 or shape[1] != expected[axes[name]]:
            raise ValueError(f"{name!r} has shape {shape}; the store keeps per-token activations [batch, pos, ...]")
        shapes[name] = shape[2:]
    return shapes


class _RunnerCache(dict):
    """The runners built for one model, stored on the model (so they live and die with it: nothing global keeps
    a model alive); a copy or a pickle of the model starts without them."""

    def __deepcopy__(self, memo: dict) -> _RunnerCache:
        return _RunnerCache()

    def __reduce__(self) -> tuple:
        return (_RunnerCache, ())


_CACHE_ATTRIBUTE = "_t5hooks_extract_runners"


def runner_for(
    model: Any, shapes: dict[str, tuple[int, ...]], backend: str, needs_decoder: bool, weights: str
) -> CaptureRunner:
    """One runner per (model, hooks, backend, weights): later extract calls reuse the compiled graph or the ONNX
    session (an exported snapshot of the weights, hence the weights' hash in the key)."""
    key = (tuple(shapes), backend, needs_decoder, weights)
    runners = model.__dict__.get(_CACHE_ATTRIBUTE)
    if runners is None:
        runners = _RunnerCache()
        object.__setattr__(model, _CACHE_ATTRIBUTE, runners)  # a plain attribute, not a submodule
    if key not in runners:
        start_id = getattr(model.cfg, "decoder_start_token_id", 0)
        runners[key] = CaptureRunner(model, shapes, backend, needs_decoder, start_id)
    return runners[key]


class CaptureRunner:
    """One forward of a padded batch through the chosen backend -> activations on the host."""

    def __init__(
        self,
        model: Any,
        shapes: dict[str, tuple[int, ...]],  # hook name -> per-token shape
        backend: str,
        needs_decoder: bool,
        start_id: int,
    ) -> None:
        self.names, self.shapes = list(shapes), shapes
        self.backend, self.needs_decoder, self.start_id = backend, needs_decoder, start_id
        self.device = next(model.parameters()).device
        self.encoder_only = False
        self.switch: Any = None  # backend "auto": the compile_policy.SwitchWhenPaid deciding when to compile
        if backend == "onnx":
            from ..export import OnnxRunner, to_onnx

            self._tmp = tempfile.TemporaryDirectory(prefix="t5hooks-extract-")
            path = to_onnx(model, Path(self._tmp.name) / "capture.onnx", capture=self.names)
            self.fn = OnnxRunner(path, providers=["CPUExecutionProvider"])
            self.needs_decoder = hasattr(model, "decode")  # an encoder-decoder graph always takes a decoder input
        else:
            # only encoder-stack hooks and no decoder input: run the encoder alone (no decoder, no logits)
            self.encoder_only = not needs_decoder and encoder_stack_only(model, self.names)
            if self.encoder_only and hasattr(model, "decode"):
                from ..capture import EncoderCaptureModule

                cap = EncoderCaptureModule(model, self.names).eval()
            else:
                cap = model.capture(self.names).eval()  # an encoder-only model's capture runs just the encoder
            self.eager = cap
            self.fn = cap
            if backend in ("compile", "auto"):
                from ..capture import compile_capture
                from ..compile_policy import SwitchWhenPaid

                self.compiled = compile_capture(cap)  # regional, warm-started, announced; compiles at first call
                if backend == "compile":
                    self.fn = self.compiled
                else:  # start eagerly; compile when the measured eager speed says the rest of the job pays for it
                    cost, entry = self.compiled.expected_cost("inference"), self.compiled.cache_entry("inference")
                    self.switch = SwitchWhenPaid(cost, record=entry)
        self.prompts_to_run: int | None = None  # this run's prompts, set by the extraction loop when known
        self.prompts = self.padded_tokens = 0  # run so far

    def run(self, items: list[Encoded], pad_id: int) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
        tokens, mask = pad([e.tokens for e in items], pad_id)  # [B,E]
        inputs = {"encoder": (tokens, mask)}
        dec = dec_mask = None
        if self.needs_decoder:
            dec_rows = [e.decoder_tokens or [self.start_id] for e in items]
            dec, dec_mask = pad(dec_rows, pad_id)  # [B,D]
        else:
            dec_mask = torch.ones(len(items), 1, dtype=torch.bool)  # the model's default: one start token
            dec = torch.full((len(items), 1), self.start_id, dtype=torch.long)
        inputs["decoder"] = (dec, dec_mask)
        if self.backend == "onnx":
            feeds = dict(input=tokens, one_zero_attention_mask=mask.long())
            if self.needs_decoder:  # a HookedT5Encoder's graph takes no decoder input
                feeds.update(decoder_input=dec, decoder_attention_mask=dec_mask.long())
            out = {k: torch.from_numpy(v) for k, v in self.fn(**feeds).items()}
        else:
            fn, start = self.fn, time.perf_counter()
            if self.encoder_only:
                out = fn(tokens.to(self.device), one_zero_attention_mask=mask.long().to(self.device))
            else:
                d = self.device  # without decoder targets: the model's default, one start token, with its mask given
                out = fn(tokens.to(d), dec.to(d), mask.long().to(d), dec_mask.long().to(d))
            if self.switch is not None:
                self._decide(fn, time.perf_counter() - start, len(items), tokens.numel())
        return out, inputs

    def describe(self) -> str:
        """Which backend ran: "eager", "compile", "onnx", or for "auto" what it chose and when."""
        if self.switch is None:
            return self.backend
        if self.fn is self.eager:
            return f"auto: eager (compiling would not pay: {self.switch.cost.describe()})"
        seconds = self.compiled.compile_seconds.get("inference")
        took = f", compiled in {seconds:.1f} s" if seconds is not None else ""
        return f"auto: eager, then compiled after {self.switch.steps} batches{took}"

    def _decide(self, fn: Any, seconds: float, prompts: int, padded: int) -> None:
        """backend="auto": time eager steps until compiling pays for the rest of the job (then switch), and time
        compiled steps to record the measured speed-up for the next decision on this machine."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.prompts += prompts
        self.padded_tokens += padded
        if fn is self.eager:
            self.switch.observe(seconds, padded)
            remaining = None
            if self.prompts_to_run is not None:  # padded tokens still to run, at the mean so far
                remaining = max(self.prompts_to_run - self.prompts, 0) * self.padded_tokens / self.prompts
            if self.switch.should_compile(remaining):
                self.fn = self.compiled  # compiles (announced) at the next batch
            return
        self.switch.observe_compiled(seconds, padded)


def pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return tokens, mask
