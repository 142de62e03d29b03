"""Regional compilation: every layer of a stack is one nested compile region, compiled once and reused.

Under `torch.compile` (not `torch.export`, not eager) `encode` / `decode` run each block through
`torch.compiler.nested_compile_region`: Dynamo traces the first encoder block and the first decoder block,
inductor compiles each once (forward and backward), and the other layers reuse that code with their own
weights. The whole capture is still one `fullgraph=True` graph (0 graph breaks); only the compile work shrinks
from `n_layers` copies to one per stack.

A region may be reused only if its trace cannot depend on the layer, so inside it hook points are addressed
by their name within the block (`hook_resid_post`, `attn.hook_q`: `HookPoint.local_name`), through a
`LayerIO` built from constants, and the block's captured activations come back as the region's outputs. A
layer whose capture / patch / intervention set differs from the others (say only layer 3 is captured)
gets its own region, compiled once too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from .components import AttentionContext
from .hook_io import HookIO
from .hook_points import HookPoint

# Distinct (block kind, capture plan, shapes) entries one region function may hold: one per layer at most,
# and T5-XXL has 24 per stack. Past it torch raises instead of silently compiling every layer.
MAX_REGION_ENTRIES = 128


class LayerIO(HookIO):
    """A `HookIO` keyed by names inside one block (`hook_resid_post`, `attn.hook_q`), so the same trace
    serves every layer."""

    def key(self, point: HookPoint) -> str:
        return point.local_name


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What one block reads from and writes to the forward's `HookIO`, with layer-free names."""

    prefix: str  # "encoder.3."
    capture: tuple[str, ...]  # local names
    patch_modes: tuple[tuple[str, str], ...]  # (local name, mode)
    patches: tuple[Tensor, ...]  # in patch_modes order


def layer_plan(io: HookIO | None, prefix: str) -> LayerPlan | None:
    """The part of `io` that concerns the block whose hook names start with `prefix`; None when an
    intervention sits in the block (its module and side outputs stay inline in the enclosing graph)."""
    if io is None:
        return LayerPlan(prefix, (), (), ())
    if any(name.startswith(prefix) for name in io.interventions):
        return None
    n = len(prefix)
    capture = tuple(sorted(name[n:] for name in io.capture if name.startswith(prefix)))
    patch_modes = tuple((name[n:], mode) for name, mode in io.patch_modes.items() if name.startswith(prefix))
    patches = tuple(io.patches[prefix + local] for local, _ in patch_modes)
    return LayerPlan(prefix, capture, patch_modes, patches)


def uses_regions(io: HookIO | None, *caches: Any) -> bool:
    """Regions apply while `torch.compile` traces (not export, not eager, not incremental decoding, not under
    `dynamic=True`) unless the capture asked for a whole-graph compile (`compile_capture(..., regional=False)`)."""
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if not torch._dynamo.config.assume_static_by_default:  # imported: we are compiling
        # `torch.compile(..., dynamic=True)` turns the blocks' float attributes (LayerNorm eps) into symbolic
        # floats, which a region cannot take as operands in torch 2.13 (inductor refuses them): run inline
        return False
    if any(cache is not None for cache in caches):
        return False
    return io is None or io.regional


def _ctx_values(ctx: AttentionContext) -> tuple[Any, ...]:
    """The context's fields as region arguments. The shared bias table is layer 0's own parameter: passed as
    it is, the region traced for layer 0 would read it through that block and fit no other layer, so it goes
    in as a copy (`[num_buckets, H]`, gradients flow back through the copy)."""
    values = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx)}
    if values["table"] is not None:
        values["table"] = values["table"].clone()
    return tuple(values.values())


def _layer_io(capture: tuple, patch_modes: tuple, patches: tuple) -> LayerIO:
    modes = dict(patch_modes)
    return LayerIO(capture, modes, dict(zip(modes, patches)))


@torch.compiler.nested_compile_region(max_reuse_entries=MAX_REGION_ENTRIES)  # imports no Dynamo
def _encoder_block(
    block: nn.Module,
    resid: Tensor,
    ctx: tuple,
    capture: tuple,
    patch_modes: tuple,
    patches: tuple,
) -> tuple[Tensor, ...]:  # (resid, *captured in `capture` order)
    io = _layer_io(capture, patch_modes, patches)
    out = block(resid, AttentionContext(*ctx), io)
    return (out, *(io.outputs[name].clone() for name in capture))


@torch.compiler.nested_compile_region(max_reuse_entries=MAX_REGION_ENTRIES)
def _decoder_block(
    block: nn.Module,
    resid: Tensor,
    encoder_out: Tensor,
    self_ctx: tuple,
    cross_ctx: tuple,
    capture: tuple,
    patch_modes: tuple,
    patches: tuple,
) -> tuple[Tensor, ...]:  # (resid, *captured in `capture` order)
    io = _layer_io(capture, patch_modes, patches)
    out = block(resid, encoder_out, AttentionContext(*self_ctx), AttentionContext(*cross_ctx), io)
    return (out, *(io.outputs[name].clone() for name in capture))


def _record(io: HookIO | None, plan: LayerPlan, outputs: list[Tensor]) -> None:
    """Put the region's captured activations into the forward's `io`, in the block's hook order."""
    if io is not None:
        for local, value in zip(plan.capture, outputs):
            io.outputs[plan.prefix + local] = value


def _prefix(block: nn.Module) -> str:
    """`encoder.3.`: the start of the block's hook names."""
    return block.hook_resid_pre.name[: -len("hook_resid_pre")]


def run_encoder_block(block: nn.Module, resid: Tensor, ctx: AttentionContext, io: HookIO | None) -> Tensor:
    """`block(resid, ctx, io)`, as a compile region when `uses_regions(io)`."""
    plan = layer_plan(io, _prefix(block)) if uses_regions(io) else None
    if plan is None:
        return block(resid, ctx, io)
    resid, *captured = _encoder_block(block, resid, _ctx_values(ctx), plan.capture, plan.patch_modes, plan.patches)
    _record(io, plan, captured)
    return resid


def run_decoder_block(
    block: nn.Module,
    resid: Tensor,  # [B,D,d_model]
    encoder_out: Tensor | None,  # [B,E,d_model]
    self_ctx: AttentionContext,
    cross_ctx: AttentionContext,
    io: HookIO | None,
    self_cache: Any = None,
    cross_cache: Any = None,
) -> Tensor:
    """`block(resid, encoder_out, self_ctx, cross_ctx, io, caches)`, as a compile region when `uses_regions`."""
    regional = encoder_out is not None and uses_regions(io, self_cache, cross_cache)
    plan = layer_plan(io, _prefix(block)) if regional else None
    if plan is None:
        return block(resid, encoder_out, self_ctx, cross_ctx, io, self_cache=self_cache, cross_cache=cross_cache)
    resid, *captured = _decoder_block(
        block,
        resid,
        encoder_out,
        _ctx_values(self_ctx),
        _ctx_values(cross_ctx),
        plan.capture,
        plan.patch_modes,
        plan.patches,
    )
    _record(io, plan, captured)
    return resid
