"""What the ranks of a `torchrun` training run share, so that N ranks equal one process on the global batch.

Gradients: every rank computes the gradient of ITS share of the global-batch loss (its sum over tokens divided by
the global token count), so the sum over ranks is exactly the gradient of the global mean, whatever each rank's
batch size. `sum_gradients` adds them across ranks with one all-reduce per bucket of at most `BUCKET_BYTES`
(flattened, as DistributedDataParallel's buckets are): the same arithmetic DDP performs (DDP all-reduces each
bucket's SUM and divides by the world size; with per-rank means that average equals the global mean only when
every rank holds the same number of tokens, which variable-length live batches break), without DDP's
requirement that one `forward()` produce every parameter's gradient (the SAE trainer's steps are custom
autograd kernels and several SAEs per optimiser). Reductions run in a fixed order on every rank.
Everything else that must agree (dead-feature counts, BatchTopK thresholds, resampling candidates, metrics) is
reduced or gathered explicitly where it is computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

BUCKET_BYTES = 25 * 1024 * 1024  # DistributedDataParallel's default bucket_cap_mb


def active() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0 (or no process group): the rank that writes files and shows progress."""
    return rank_and_world()[0] == 0


def all_reduce_sum(t: Tensor) -> Tensor:
    """In place SUM over ranks (no-op in one process); returns `t`."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on any: one decision for all ranks (e.g. when to switch to a compiled
    step, which each rank would time differently)."""
    if not active():
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device))[0] > 0)


def all_reduce_min(t: Tensor) -> Tensor:
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def gather_rows(x: Tensor) -> Tensor:
    """`[sum of ranks' rows, ...]`: every rank's `x` concatenated in rank order (row counts may differ)."""
    if not active():
        return x
    world = dist.get_world_size()
    counts = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    all_counts = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    sizes = [int(c) for c in all_counts]
    longest = max(sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def broadcast_parameters(params: Iterable[Tensor]) -> None:
    """Every rank starts from rank 0's values (as DistributedDataParallel does at construction)."""
    if not active():
        return
    for bucket in _buckets([p.data for p in params]):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.broadcast(flat, src=0)
        _unflatten_into(flat, bucket)


def sum_gradients(params: Sequence[Tensor]) -> None:
    """Add every parameter's `.grad` across ranks, bucketed (a missing gradient counts as zeros)."""
    if not active():
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    pending = []
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        pending.append((dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True), flat, bucket))
    for work, flat, bucket in pending:
        work.wait()
        _unflatten_into(flat, bucket)


def _buckets(tensors: Sequence[Tensor]) -> list[list[Tensor]]:
    """Consecutive groups of at most BUCKET_BYTES (a larger tensor is a bucket of its own), per dtype/device."""
    buckets: list[list[Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        last = buckets[-1] if buckets else None
        if last is None or size + nbytes > BUCKET_BYTES or (last[0].dtype, last[0].device) != (t.dtype, t.device):
            buckets.append([t])
            size = nbytes
        else:
            last.append(t)
            size += nbytes
    return buckets


def _unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n
