"""`relbias_attention`: argument checks, backend dispatch, and the custom ops around the Triton kernels.

`torch.ops.t5hooks.relbias_attention` (forward, returns the output and the logsumexp) and
`torch.ops.t5hooks.relbias_attention_backward` are `torch.library.custom_op`s with fake (meta)
implementations and autograd, so `torch.compile(fullgraph=True)` keeps them as single nodes.
They are custom ops rather than `triton_op`s: a `triton_op` is traced into by the compiler,
which cannot run interpreted kernels (`TRITON_INTERPRET=1`, how CPU-only CI tests them) on fake
tensors; an opaque op works the same with compiled and interpreted kernels.

Triton is imported only when a kernel first runs, so `import t5hooks` stays fast and works
without triton installed.
"""

import functools
import numbers

import torch
from torch import Tensor

from . import prep
from .policy import TRITON_AVAILABLE
from .reference import reference_relbias_attention

BACKENDS = ("auto", "triton", "reference")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_MAX_HEAD_DIM = 128


def relbias_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_bias_table: Tensor | None = None,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    q_offset: "int | Tensor" = 0,
    scale: float = 1.0,
    backend: str = "auto",
) -> Tensor:
    """T5 attention `softmax(q k^T * scale + bias + mask) v`: q `[B,H,Q,d]`, k/v `[B,H,K,d]` -> `[B,H,Q,d]`.

    The bias of query i and key j is `rel_bias_table[bucket(j - (i + q_offset)), h]`, with T5's
    bucketing (`bidirectional` for encoders, `num_buckets`, `max_distance`); `rel_bias_table` is
    `[num_buckets, H]`, or None for no bias (cross attention). `key_padding_mask` `[B, K]` marks
    keys to attend with 1/True; `causal` hides keys after the query's position `i + q_offset`
    (`q_offset` = number of cached keys before the queries when decoding). Rows that see no key
    give zeros. T5 uses `scale=1.0`. The softmax runs in fp32.

    `backend`: "triton" runs the fused kernels (grads for q, k, v and the table; on CPU only
    under `TRITON_INTERPRET=1`); "reference" the plain-PyTorch path; "auto" (default) the kernels
    for CUDA fp16/bf16/fp32 tensors with d <= 128 when triton is installed, else the reference,
    and always the reference while `torch.export` traces (exported graphs hold standard ops).
    With the kernels, `q_offset` must be a Python int (a tensor is read with `int()`).
    Raises ValueError for inconsistent arguments.
    """
    check_arguments(
        q, k, v, rel_bias_table, key_padding_mask,
        bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance,
        q_offset=q_offset, scale=scale, backend=backend,
    )  # fmt: skip
    if use_kernels(backend, q):
        out, _ = torch.ops.t5hooks.relbias_attention(
            q, k, v, rel_bias_table, key_padding_mask,
            bidirectional, num_buckets, max_distance, causal, int(q_offset), float(scale),
        )  # fmt: skip
        return out
    return reference_relbias_attention(
        q, k, v, rel_bias_table,
        bidirectional=bidirectional, max_distance=max_distance, causal=causal,
        key_padding_mask=key_padding_mask, q_offset=q_offset, scale=scale,
    )  # fmt: skip


def use_kernels(backend: str, q: Tensor) -> bool:
    """Whether `backend` (already checked) resolves to the Triton kernels for these inputs."""
    if backend == "triton":
        return True
    if backend == "reference":
        return False
    return (
        TRITON_AVAILABLE
        and q.is_cuda
        and q.dtype in KERNEL_DTYPES
        and q.shape[-1] <= KERNEL_MAX_HEAD_DIM
        and not torch.compiler.is_exporting()
    )


def check_arguments(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_bias_table: Tensor | None,
    key_padding_mask: Tensor | None,
    *,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
    q_offset: "int | Tensor",
    scale: float,
    backend: str,
) -> None:
    """Raise ValueError naming the first inconsistent argument and what would be valid."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    for name, x, layout in (("q", q, "[B, H, Q, d]"), ("k", k, "[B, H, K, d]"), ("v", v, "[B, H, K, d]")):
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 4-D tensor {layout}; got {got}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, H, K, d]; got {tuple(k.shape)} and {tuple(v.shape)}")
    for dim, what in ((0, "batch size B"), (1, "number of heads H"), (3, "head dim d")):
        if q.shape[dim] != k.shape[dim]:
            raise ValueError(
                f"q and k must agree on the {what} (dim {dim}); got q {tuple(q.shape)} and k {tuple(k.shape)}"
            )
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k and v must share one floating dtype; got {q.dtype}, {k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device; got {q.device}, {k.device} and {v.device}")
    batch, n_heads, _, head_dim = q.shape
    k_len = k.shape[2]

    if not isinstance(num_buckets, int) or num_buckets < (4 if bidirectional else 2):
        raise ValueError(
            f"num_buckets must be an int >= {4 if bidirectional else 2} "
            f"({'bidirectional' if bidirectional else 'unidirectional'}); got {num_buckets!r}"
        )
    exact = prep.max_exact(num_buckets, bidirectional)
    if not isinstance(max_distance, int) or max_distance <= exact:
        raise ValueError(
            f"max_distance must be an int greater than the {exact} exact distances of "
            f"num_buckets={num_buckets} ({'bi' if bidirectional else 'uni'}directional); got {max_distance!r}"
        )
    if rel_bias_table is not None:
        if not isinstance(rel_bias_table, Tensor) or rel_bias_table.dim() != 2:
            got = tuple(rel_bias_table.shape) if isinstance(rel_bias_table, Tensor) else type(rel_bias_table).__name__
            raise ValueError(
                f"rel_bias_table must be a [num_buckets, H] = [{num_buckets}, {n_heads}] tensor; got {got}"
            )
        if tuple(rel_bias_table.shape) != (num_buckets, n_heads):
            raise ValueError(
                f"rel_bias_table must be [num_buckets, H] = [{num_buckets}, {n_heads}]; got {tuple(rel_bias_table.shape)}"
            )
        if not rel_bias_table.dtype.is_floating_point:
            raise ValueError(f"rel_bias_table must be floating point; got {rel_bias_table.dtype}")
        if rel_bias_table.device != q.device:
            raise ValueError(f"rel_bias_table must be on q's device {q.device}; got {rel_bias_table.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or tuple(key_padding_mask.shape) != (batch, k_len):
            got = (
                tuple(key_padding_mask.shape)
                if isinstance(key_padding_mask, Tensor)
                else type(key_padding_mask).__name__
            )
            raise ValueError(f"key_padding_mask must be [B, K] = [{batch}, {k_len}] (1 = attend); got {got}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}; got {key_padding_mask.device}")
    if isinstance(q_offset, Tensor):
        if q_offset.numel() != 1 or q_offset.dtype.is_floating_point or q_offset.dtype.is_complex:
            raise ValueError(f"q_offset must be an int or a one-element integer tensor; got {q_offset!r}")
    elif not isinstance(q_offset, int) or isinstance(q_offset, bool) or q_offset < 0:
        raise ValueError(f"q_offset must be an int >= 0 (the number of cached keys); got {q_offset!r}")
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise ValueError(f"scale must be a real number; got {scale!r}")

    if backend == "triton":
        if q.dtype not in KERNEL_DTYPES:
            raise ValueError(
                f"backend='triton' supports float16, bfloat16 and float32 inputs; got {q.dtype} "
                "(use backend='reference')"
            )
        if head_dim > KERNEL_MAX_HEAD_DIM:
            raise ValueError(
                f"backend='triton' supports head dims up to {KERNEL_MAX_HEAD_DIM}; got {head_dim} "
                "(use backend='reference')"
            )


# --- custom ops -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _bucket_by_distance(num_buckets: int, max_distance: int, bidirectional: bool, device: torch.device) -> Tensor:
    """Cached per-distance bucket ids (they depend on the configuration only)."""
    return prep.bucket_by_distance(num_buckets, max_distance, bidirectional=bidirectional, device=device)


def _kernel_inputs(q, k, v, rel_bias_table, key_padding_mask, bidirectional, num_buckets, max_distance):
    """Host-side preparation shared by forward and backward (see `prep.py`)."""
    inputs = dict(
        q=prep.unit_last_stride(q),
        k=prep.unit_last_stride(k),
        v=prep.unit_last_stride(v),
        bound=prep.distance_bound(max_distance, rel_bias_table is not None),
        bucket_by_distance=None,
        bias_by_distance=None,
        key_mask=None,
        key_ranges=None,
    )
    if rel_bias_table is not None:
        buckets = _bucket_by_distance(num_buckets, max_distance, bidirectional, q.device)
        inputs["bucket_by_distance"] = buckets
        inputs["bias_by_distance"] = prep.bias_by_distance(rel_bias_table, buckets)
    if key_padding_mask is not None:
        inputs["key_mask"] = prep.key_mask_int8(key_padding_mask)
        inputs["key_ranges"] = prep.key_ranges(key_padding_mask)
    return inputs


def _launchers():
    """Import the kernels (and triton) on first use; check they can run on this device."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("backend='triton' needs the triton package (pip install 't5hooks[gpu]')")
    from triton.runtime.interpreter import InterpretedFunction

    from . import triton_backward, triton_decode, triton_forward

    interpreted = isinstance(triton_forward._forward_kernel, InterpretedFunction)
    return triton_forward, triton_backward, triton_decode, interpreted


def _check_device(q: Tensor, interpreted: bool) -> None:
    if q.device.type != "cuda" and not interpreted:
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got {q.device}); on CPU set TRITON_INTERPRET=1 "
            "before the kernels are first used, or use backend='reference'"
        )


@torch.library.custom_op("t5hooks::relbias_attention", mutates_args=())
def relbias_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_bias_table: Tensor | None,
    key_padding_mask: Tensor | None,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
    causal: bool,
    q_offset: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Fused forward. Returns out `[B,H,Q,d]` (q's dtype) and logsumexp `[B,H,Q]` (fp32, +inf for
    rows that see no key). Arguments as `relbias_attention`, unchecked."""
    batch, n_heads, q_len, head_dim = q.shape
    if q.numel() == 0 or k.shape[2] == 0:
        out = torch.zeros((batch, n_heads, q_len, head_dim), dtype=q.dtype, device=q.device)
        return out, torch.full((batch, n_heads, q_len), float("inf"), device=q.device)
    forward, _, decode, interpreted = _launchers()
    _check_device(q, interpreted)
    inputs = _kernel_inputs(q, k, v, rel_bias_table, key_padding_mask, bidirectional, num_buckets, max_distance)
    launch = decode.launch_decode if q_len <= decode.DECODE_MAX_QUERIES else forward.launch_forward
    return launch(
        inputs["q"], inputs["k"], inputs["v"], inputs["bias_by_distance"], inputs["key_mask"], inputs["key_ranges"],
        causal=causal, q_offset=q_offset, bound=inputs["bound"], scale=scale, interpreted=interpreted,
    )  # fmt: skip


@relbias_attention_op.register_fake
def _(q, k, v, rel_bias_table, key_padding_mask, bidirectional, num_buckets, max_distance, causal, q_offset, scale):
    batch, n_heads, q_len, head_dim = q.shape
    out = q.new_empty((batch, n_heads, q_len, head_dim))
    lse = q.new_empty((batch, n_heads, q_len), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("t5hooks::relbias_attention_backward", mutates_args=())
def relbias_attention_backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_bias_table: Tensor | None,
    key_padding_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
    causal: bool,
    q_offset: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused backward: dq, dk, dv and the table gradient `[num_buckets, H]` (empty without a table).

    The table gradient is reduced without atomics and is bit-identical from run to run."""
    batch, n_heads, q_len, head_dim = q.shape
    has_table = rel_bias_table is not None
    if q.numel() == 0 or k.shape[2] == 0:
        d_table = rel_bias_table.new_zeros(rel_bias_table.shape) if has_table else q.new_empty(0)
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape), d_table
    _, backward, _, interpreted = _launchers()
    _check_device(q, interpreted)
    inputs = _kernel_inputs(q, k, v, rel_bias_table, key_padding_mask, bidirectional, num_buckets, max_distance)
    dq, dk, dv, d_table = backward.launch_backward(
        prep.unit_last_stride(grad_out), inputs["q"], inputs["k"], inputs["v"], out, lse,
        inputs["bias_by_distance"], inputs["bucket_by_distance"], num_buckets,
        inputs["key_mask"], inputs["key_ranges"],
        causal=causal, q_offset=q_offset, bound=inputs["bound"], scale=scale, interpreted=interpreted,
    )  # fmt: skip
    d_table = d_table.to(rel_bias_table.dtype).contiguous() if has_table else q.new_empty(0)
    return dq, dk, dv, d_table


@relbias_attention_backward_op.register_fake
def _(grad_out, q, k, v, rel_bias_table, key_padding_mask, out, lse, *options):
    d_table = rel_bias_table.new_empty(rel_bias_table.shape) if rel_bias_table is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_table


def _setup_context(ctx, inputs, output):
    q, k, v, rel_bias_table, key_padding_mask, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rel_bias_table, key_padding_mask, out, lse)
    ctx.options = options  # bidirectional, num_buckets, max_distance, causal, q_offset, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, rel_bias_table, key_padding_mask, out, lse = ctx.saved_tensors
    dq, dk, dv, d_table = torch.ops.t5hooks.relbias_attention_backward(
        grad_out, q, k, v, rel_bias_table, key_padding_mask, out, lse, *ctx.options
    )
    no_grad = (None,) * len(ctx.options)
    return dq, dk, dv, (d_table if rel_bias_table is not None else None), None, *no_grad


relbias_attention_op.register_autograd(_backward, setup_context=_setup_context)
