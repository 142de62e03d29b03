"""Autoregressive decoding for HookedEncoderDecoder: greedy, sampling and beam search with a KV cache.

The encoder runs once; the decoder runs one position per step through `model.decode` with a
`DecoderCache` (self-attention K/V appended per step, cross-attention K/V computed at the first
step). Python hooks on the model fire at every step, so steering hooks act during generation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .analysis.cache import ActivationCache
from .hook_io import NameFilter
from .kv_cache import DecoderCache
from .stopping import stop_tokens

NEG_INF = -1.0e9  # the "impossible" score HF's beam search uses


@dataclass
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    freq_penalty: float = 0.0

    def validate(self) -> None:
        """Each argument of the right type, finite and in range (checked even when do_sample is False,
        so a bad value never waits for the first sampled call to fail)."""
        if not _is_real(self.freq_penalty) or not math.isfinite(self.freq_penalty) or self.freq_penalty < 0:
            raise ValueError(f"freq_penalty must be a finite number >= 0, got {self.freq_penalty!r}")
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")
        if self.top_k is not None and self.top_p is not None:
            raise ValueError(
                "top_k and top_p are exclusive (TransformerLens's sample_logits applies only top_k when both are "
                "given); pass one of them"
            )
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and (not _is_real(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {self.top_p!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@torch.no_grad()
def generate(
    model: Any,
    input: Any,
    max_new_tokens: int = 10,
    *,
    one_zero_attention_mask: Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    freq_penalty: float = 0.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    stop_at_eos: bool = True,
    use_past_kv_cache: bool = True,
    seed: int | None = None,
    return_type: Literal["input", "tensor", "str"] = "input",
    verbose: bool = False,
    return_cache: bool = False,
    names_filter: NameFilter = None,
) -> Any:
    """Generate up to `max_new_tokens` decoder tokens per input (TransformerLens's keywords, plus beams).

    Greedy unless `do_sample` (then `temperature`, 0 meaning greedy; `freq_penalty`, which lowers each
    temperature-scaled logit by the penalty times how often the token already occurs in the decoder output; and
    `top_k` or `top_p`: TransformerLens's `sample_logits`). `eos_token_id`: an id or a list of ids (a row stops at
    any of them, as TransformerLens); default the config's EOS. `max_new_tokens` is a bound, not a size: nothing is
    allocated for it. `use_past_kv_cache=False` reruns the decoder over the whole prefix at every step (same tokens,
    slower; hooks then see every position). `verbose` shows a tqdm bar.
    Returns tokens `[B, 1 + T]` (starting with the decoder start token, rows that stopped at EOS
    padded with the pad token, as Hugging Face does; `return_type="tensor"`) or decoded strings
    (`return_type="str"`, or "input" with text input). With `return_cache=True`, also a list with one
    ActivationCache per step (`names_filter` selects the hook points; step 0 includes the encoder's); with
    beams, row `b * num_beams + i` of step t is what produced running beam i of input b after step t.
    """
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not _is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if not _is_real(length_penalty) or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    if return_type == "tokens":  # earlier name of "tensor"
        return_type = "tensor"
    if return_type not in ("input", "tensor", "str"):
        raise ValueError(f"return_type={return_type!r}; valid: 'input', 'tensor', 'str'")
    sampling = SamplingConfig(do_sample, temperature, top_k, top_p, freq_penalty)
    sampling.validate()
    if num_beams > 1 and do_sample:
        raise ValueError("beam sampling is not supported: use num_beams > 1 or do_sample=True, not both")
    text_input = isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str))
    tokens, mask, _, _, _ = model.prepare_inputs(input, None, one_zero_attention_mask)
    eos = stop_tokens(
        model.cfg.eos_token_id if eos_token_id is None else eos_token_id, model.cfg.d_vocab, tokens.device
    )
    generator = None if seed is None else torch.Generator(device=tokens.device).manual_seed(seed)

    steps: list[dict[str, Tensor]] = []
    hooks = []
    if return_cache:

        def record(tensor: Tensor, hook: Any) -> None:
            steps[-1][hook.name] = tensor.detach()

        hooks = [(name, record) for name in model.resolve_names(names_filter)]

    progress = None
    if verbose:
        from tqdm.auto import tqdm

        progress = tqdm(total=max_new_tokens, desc="generate")

    def new_step() -> None:  # called once per decoding step (the first also runs the encoder)
        if return_cache:
            steps.append({})
        if progress is not None:
            progress.update(1)

    def reorder_step(index: Tensor) -> None:
        """Beam search reordered its beams: put the last step's rows in the new beam order too."""
        if return_cache:
            rows = index.shape[0]
            steps[-1] = {k: v.index_select(0, index) if v.shape[0] == rows else v for k, v in steps[-1].items()}

    stepper = _Stepper(model, use_past_kv_cache)
    try:
        with model.hooks(fwd_hooks=hooks):
            if num_beams == 1:
                out = _sample_loop(
                    stepper, tokens, mask, max_new_tokens, sampling, eos if stop_at_eos else None, generator, new_step
                )
            else:
                out = _beam_search(
                    stepper,
                    tokens,
                    mask,
                    max_new_tokens,
                    num_beams,
                    length_penalty,
                    eos if stop_at_eos else None,
                    new_step,
                    reorder_step,
                )
    finally:
        if progress is not None:
            progress.close()
    if return_type == "str" or (return_type == "input" and text_input):
        if model.tokenizer is None:
            raise ValueError("return_type='str' needs a tokenizer: load the model with tokenizer=...")
        result: Any = [model.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in out]
        if isinstance(input, str):
            result = result[0]
    else:
        result = out
    if return_cache:
        return result, [ActivationCache(step, model) for step in steps]
    return result


def _start(model: Any, batch: int, device: torch.device) -> Tensor:
    return torch.full((batch, 1), model.cfg.decoder_start_token_id, dtype=torch.long, device=device)


class _Stepper:
    """The next-token logits of decoder prefixes: one new position through a `DecoderCache`, or (without the
    KV cache) the whole prefix recomputed."""

    def __init__(self, model: Any, use_past_kv_cache: bool) -> None:
        self.model = model
        self.cache = DecoderCache(model.cfg.n_decoder_layers) if use_past_kv_cache else None

    def next_logits(self, prefix: Tensor, encoder_out: Tensor, mask: Tensor | None) -> Tensor:  # [B,T] -> [B,V]
        if self.cache is not None:
            return self.model.decode(prefix[:, -1:], encoder_out, mask, cache=self.cache)[:, -1].float()
        return self.model.decode(prefix, encoder_out, mask)[:, -1].float()

    def reorder(self, index: Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index)


def _sample_loop(stepper, tokens, mask, max_new_tokens, sampling, eos, generator, new_step) -> Tensor:
    """Greedy (or sampled) decoding; finished rows continue with the pad token."""
    model = stepper.model
    B = tokens.shape[0]
    new_step()
    encoder_out = model.encode(tokens, mask)
    out = _start(model, B, tokens.device)
    unfinished = torch.ones(B, dtype=torch.bool, device=tokens.device)
    for step in range(max_new_tokens):
        if step > 0:
            new_step()
        logits = stepper.next_logits(out, encoder_out, mask)  # [B, V]
        next_token = choose_token(logits, sampling, generator, previous=out)
        next_token = torch.where(unfinished, next_token, torch.full_like(next_token, model.cfg.pad_token_id))
        out = torch.cat([out, next_token[:, None]], dim=1)
        if eos is not None:
            unfinished &= ~torch.isin(next_token, eos)
            if not unfinished.any():
                break
    return out


def choose_token(
    logits: Tensor,  # [B, V]
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
    previous: Tensor | None = None,  # [B, T] the decoder tokens so far (start token included), for freq_penalty
) -> Tensor:  # [B]
    """Argmax, or TransformerLens's `sample_logits`: temperature (0: argmax), then `freq_penalty` times each
    token's count in `previous`, then top-k or top-p (nucleus) filtering, then a sample."""
    if not sampling.do_sample or sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.freq_penalty > 0 and previous is not None:
        counts = torch.zeros_like(logits).scatter_add_(1, previous, torch.ones_like(previous, dtype=logits.dtype))
        logits = logits - sampling.freq_penalty * counts
    if sampling.top_k is not None:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= sampling.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _beam_search(
    stepper, tokens, mask, max_new_tokens, num_beams, length_penalty, eos, new_step, reorder_step
) -> Tensor:
    """Beam search scored like Hugging Face's default (length_penalty on the generated length,
    early_stopping=False heuristic): keeps `num_beams` running and `num_beams` finished hypotheses."""
    model = stepper.model
    B, V = tokens.shape[0], model.cfg.d_vocab
    device = tokens.device
    K = 2 * num_beams  # candidates kept per step, so num_beams can still run after some finish
    max_len = 1 + max_new_tokens
    pad = model.cfg.pad_token_id

    new_step()
    beam_tokens = tokens.repeat_interleave(num_beams, dim=0)
    beam_mask = None if mask is None else mask.repeat_interleave(num_beams, dim=0)
    encoder_out = model.encode(beam_tokens, beam_mask)

    # sequences grow by one column per step (nothing is sized by max_new_tokens, which may be huge)
    running = torch.full((B, num_beams, 1), model.cfg.decoder_start_token_id, dtype=torch.long, device=device)
    running_scores = torch.full((B, num_beams), NEG_INF, device=device)
    running_scores[:, 0] = 0.0
    finished = running.clone()
    finished_scores = torch.full((B, num_beams), NEG_INF, device=device)
    finished_any = torch.zeros((B, num_beams), dtype=torch.bool, device=device)
    finished_len = torch.ones((B, num_beams), dtype=torch.long, device=device)  # tokens incl. the start token
    can_improve = torch.ones((B, 1), dtype=torch.bool, device=device)
    is_top = torch.arange(K, device=device) < num_beams  # [K]
    batch_offset = (torch.arange(B, device=device) * num_beams)[:, None]

    length = 1
    while True:
        if length > 1:
            new_step()
        logits = stepper.next_logits(running.reshape(B * num_beams, length), encoder_out, beam_mask)
        log_probs = F.log_softmax(logits, dim=-1).view(B, num_beams, V)
        scores = (log_probs + running_scores[:, :, None]).view(B, -1)  # [B, beams*V]
        cand_scores, cand_index = scores.topk(K, dim=-1)  # [B, K]
        cand_beam, cand_token = cand_index // V, cand_index % V
        cand_seqs = torch.cat(
            [running.gather(1, cand_beam[:, :, None].expand(-1, -1, length)), cand_token[..., None]], 2
        )
        hits_stop = torch.full_like(cand_token, length + 1 >= max_len, dtype=torch.bool)
        if eos is not None:
            hits_stop |= torch.isin(cand_token, eos)

        # running beams for the next step: the best candidates that did not stop
        keep = (cand_scores + hits_stop.float() * NEG_INF).topk(num_beams, dim=-1).indices
        running = cand_seqs.gather(1, keep[:, :, None].expand(-1, -1, length + 1))  # [B, beams, length + 1]
        running_scores = (cand_scores + hits_stop.float() * NEG_INF).gather(1, keep)
        parent = cand_beam.gather(1, keep)  # which old beam each new running beam extends

        # finished hypotheses: stopped candidates among the top num_beams, length-normalised
        just_finished = hits_stop & is_top[None, :]
        normalised = cand_scores / (length**length_penalty)  # length = tokens generated so far + this one
        normalised = normalised + (~can_improve).float() * NEG_INF + (~just_finished).float() * NEG_INF
        merged_scores = torch.cat([finished_scores, normalised], dim=1)
        best = merged_scores.topk(num_beams, dim=-1).indices
        finished = F.pad(finished, (0, 1), value=pad)  # [B, beams, length + 1]: shorter hypotheses end in pad
        finished = torch.cat([finished, cand_seqs], dim=1).gather(1, best[:, :, None].expand(-1, -1, length + 1))
        finished_scores = merged_scores.gather(1, best)
        finished_any = torch.cat([finished_any, just_finished], dim=1).gather(1, best)
        finished_len = torch.cat([finished_len, torch.full_like(cand_token, length + 1)], dim=1).gather(1, best)

        order = (parent + batch_offset).view(-1)
        stepper.reorder(order)
        reorder_step(order)
        length += 1
        best_possible = running_scores[:, :1] / ((length - 1) ** length_penalty)
        worst_finished = torch.where(finished_any, finished_scores.min(dim=1, keepdim=True).values, NEG_INF)
        can_improve &= (best_possible > worst_finished).any(dim=-1, keepdim=True)
        if not can_improve.any() or bool(hits_stop.all()):
            break

    # the best finished hypothesis per input, trimmed to the longest of them (shorter rows end in pad)
    return finished[:, 0, : int(finished_len[:, 0].max())]
