"""Autoregressive decoding for HookedEncoderDecoder: greedy, sampling and beam search with a KV cache.

The encoder runs once; the decoder runs one position per step through `model.decode` with a
`DecoderCache` (self-attention K/V appended per step, cross-attention K/V computed at the first
step). Python hooks on the model fire at every step, so steering hooks act during generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .analysis.cache import ActivationCache
from .hook_points import NameFilter
from .kv_cache import DecoderCache

NEG_INF = -1.0e9  # the "impossible" score HF's beam search uses


@dataclass
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def validate(self) -> None:
        """Each argument of the right type, finite and in range (checked even when do_sample is False,
        so a bad value never waits for the first sampled call to fail)."""
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
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
    max_new_tokens: int = 20,
    *,
    one_zero_attention_mask: Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    eos_token_id: int | None = None,
    stop_at_eos: bool = True,
    seed: int | None = None,
    return_type: Literal["input", "tokens", "str"] = "input",
    return_cache: bool = False,
    names_filter: NameFilter = None,
) -> Any:
    """Generate up to `max_new_tokens` decoder tokens per input.

    Returns tokens `[B, 1 + T]` (starting with the decoder start token, rows that stopped at EOS
    padded with the pad token, as Hugging Face does) or decoded strings (`return_type="str"`,
    or "input" with text input). With `return_cache=True`, also a list with one ActivationCache
    per step (`names_filter` selects the hook points; step 0 includes the encoder's).
    """
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not _is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if not _is_real(length_penalty) or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    if return_type not in ("input", "tokens", "str"):
        raise ValueError(f"return_type={return_type!r}; valid: 'input', 'tokens', 'str'")
    sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
    sampling.validate()
    if num_beams > 1 and do_sample:
        raise ValueError("beam sampling is not supported: use num_beams > 1 or do_sample=True, not both")
    text_input = isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str))
    tokens, mask, _, _, _ = model.prepare_inputs(input, None, one_zero_attention_mask)
    eos = model.cfg.eos_token_id if eos_token_id is None else eos_token_id
    generator = None if seed is None else torch.Generator(device=tokens.device).manual_seed(seed)

    steps: list[dict[str, Tensor]] = []
    hooks = []
    if return_cache:

        def record(tensor: Tensor, hook: Any) -> None:
            steps[-1][hook.name] = tensor.detach()

        hooks = [(name, record) for name in model.resolve_names(names_filter)]

    def new_step() -> None:
        if return_cache:
            steps.append({})

    with model.hooks(fwd_hooks=hooks):
        if num_beams == 1:
            out = _sample_loop(
                model, tokens, mask, max_new_tokens, sampling, eos if stop_at_eos else None, generator, new_step
            )
        else:
            out = _beam_search(
                model, tokens, mask, max_new_tokens, num_beams, length_penalty, eos if stop_at_eos else None, new_step
            )
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


def _sample_loop(model, tokens, mask, max_new_tokens, sampling, eos, generator, new_step) -> Tensor:
    """Greedy (or sampled) decoding; finished rows continue with the pad token."""
    B = tokens.shape[0]
    new_step()
    encoder_out = model.encode(tokens, mask)
    cache = DecoderCache(model.cfg.n_decoder_layers)
    out = _start(model, B, tokens.device)
    unfinished = torch.ones(B, dtype=torch.bool, device=tokens.device)
    for step in range(max_new_tokens):
        if step > 0:
            new_step()
        logits = model.decode(out[:, -1:], encoder_out, mask, cache=cache)[:, -1].float()  # [B, V]
        next_token = choose_token(logits, sampling, generator)
        next_token = torch.where(unfinished, next_token, torch.full_like(next_token, model.cfg.pad_token_id))
        out = torch.cat([out, next_token[:, None]], dim=1)
        if eos is not None:
            unfinished &= next_token != eos
            if not unfinished.any():
                break
    return out


def choose_token(logits: Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """Argmax, or a sample after temperature, top-k and top-p (nucleus) filtering, in that order."""
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= sampling.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _beam_search(model, tokens, mask, max_new_tokens, num_beams, length_penalty, eos, new_step) -> Tensor:
    """Beam search scored like Hugging Face's default (length_penalty on the generated length,
    early_stopping=False heuristic): keeps `num_beams` running and `num_beams` finished hypotheses."""
    B, V = tokens.shape[0], model.cfg.d_vocab
    device = tokens.device
    K = 2 * num_beams  # candidates kept per step, so num_beams can still run after some finish
    max_len = 1 + max_new_tokens
    pad = model.cfg.pad_token_id

    new_step()
    beam_tokens = tokens.repeat_interleave(num_beams, dim=0)
    beam_mask = None if mask is None else mask.repeat_interleave(num_beams, dim=0)
    encoder_out = model.encode(beam_tokens, beam_mask)
    cache = DecoderCache(model.cfg.n_decoder_layers)

    running = torch.full((B, num_beams, max_len), pad, dtype=torch.long, device=device)
    running[:, :, 0] = model.cfg.decoder_start_token_id
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
        logits = model.decode(running[:, :, length - 1].reshape(-1, 1), encoder_out, beam_mask, cache=cache)
        log_probs = F.log_softmax(logits[:, -1].float(), dim=-1).view(B, num_beams, V)
        scores = (log_probs + running_scores[:, :, None]).view(B, -1)  # [B, beams*V]
        cand_scores, cand_index = scores.topk(K, dim=-1)  # [B, K]
        cand_beam, cand_token = cand_index // V, cand_index % V
        cand_seqs = running.gather(1, cand_beam[:, :, None].expand(-1, -1, max_len)).clone()
        cand_seqs[:, :, length] = cand_token
        hits_stop = torch.full_like(cand_token, length + 1 >= max_len, dtype=torch.bool)
        if eos is not None:
            hits_stop |= cand_token == eos

        # running beams for the next step: the best candidates that did not stop
        keep = (cand_scores + hits_stop.float() * NEG_INF).topk(num_beams, dim=-1).indices
        running = cand_seqs.gather(1, keep[:, :, None].expand(-1, -1, max_len))
        running_scores = (cand_scores + hits_stop.float() * NEG_INF).gather(1, keep)
        parent = cand_beam.gather(1, keep)  # which old beam each new running beam extends

        # finished hypotheses: stopped candidates among the top num_beams, length-normalised
        just_finished = hits_stop & is_top[None, :]
        normalised = cand_scores / (length**length_penalty)  # length = tokens generated so far + this one
        normalised = normalised + (~can_improve).float() * NEG_INF + (~just_finished).float() * NEG_INF
        merged_scores = torch.cat([finished_scores, normalised], dim=1)
        best = merged_scores.topk(num_beams, dim=-1).indices
        finished = torch.cat([finished, cand_seqs], dim=1).gather(1, best[:, :, None].expand(-1, -1, max_len))
        finished_scores = merged_scores.gather(1, best)
        finished_any = torch.cat([finished_any, just_finished], dim=1).gather(1, best)
        finished_len = torch.cat([finished_len, torch.full_like(cand_token, length + 1)], dim=1).gather(1, best)

        cache.reorder((parent + batch_offset).view(-1))
        length += 1
        best_possible = running_scores[:, :1] / ((length - 1) ** length_penalty)
        worst_finished = torch.where(finished_any, finished_scores.min(dim=1, keepdim=True).values, NEG_INF)
        can_improve &= (best_possible > worst_finished).any(dim=-1, keepdim=True)
        if not can_improve.any() or bool(hits_stop.all()):
            break

    # the best finished hypothesis per input, trimmed to the longest of them (shorter rows end in pad)
    return finished[:, 0, : int(finished_len[:, 0].max())]
