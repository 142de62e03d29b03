"""The layers of a T5: Embed, RMSNorm, Attention (self / cross), MLP (plain / gated), EncoderBlock, DecoderBlock.

Weights are stored in `nn.Linear` layout (`[out, in]`, as in Hugging Face checkpoints) so each
projection is one matmul; TransformerLens-shaped views (`W_Q` `[H, d_model, d_head]` ...) are
properties over the same storage. Every forward takes an optional `HookIO` (see hook_io.py):
`None` in ordinary eager runs, a recorder/patcher in capture, compile and export runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import HookedT5Config
from .hook_io import HookIO
from .hook_points import HookPoint
from .kernels import cpu_gemm
from .kernels.policy import fuses_by_default, layer_backend
from .kernels.reference import allowed_keys, bias_and_mask, masked_softmax, position_bias, rows_with_keys
from .kv_cache import KVCache

ACT_FNS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


RESID = ("batch", "pos", "d_model")  # residual-stream-shaped activations
REL_POS_NOTE = "the position bias hook lives on layer 0 only: encoder.0.attn.rel_pos_hook, decoder.0.attn.rel_pos_hook"
RESULT_NOTE = "hook_result exists only with cfg.use_attn_result=True; call model.set_use_attn_result(True)"
PRE_LINEAR_NOTE = "hook_pre_linear exists only in gated MLPs: T5 v1.1, mT5, ByT5"


def result_hook() -> HookPoint:
    """The per-head attention output `hook_result` (only with `cfg.use_attn_result`)."""
    return HookPoint(("batch", "pos", "head", "d_model"), note=RESULT_NOTE)


SPLIT_QKV_NOTE = "hook_q_input / hook_k_input / hook_v_input exist only after model.set_use_split_qkv_input(True)"
ATTN_IN_NOTE = "hook_attn_in / hook_cross_attn_in exist only after model.set_use_attn_in(True)"
MLP_IN_NOTE = (
    "hook_mlp_in exists only with cfg.use_hook_mlp_in=True (the default); call model.set_use_hook_mlp_in(True)"
)


def attn_in_hook() -> HookPoint:
    """A per-head copy of an attention sublayer's input, before its norm (only with `cfg.use_attn_in`)."""
    return HookPoint(("batch", "pos", "head", "d_model"), note=ATTN_IN_NOTE)


def mlp_in_hook() -> HookPoint:
    """The pre-norm residual as only the MLP reads it (TransformerLens's `hook_mlp_in`)."""
    return HookPoint(RESID, note=MLP_IN_NOTE)


def optional_hook(module: nn.Module, name: str) -> HookPoint:
    """A new optional hook point `name` of `module` (a block or an attention), with its declared axes."""
    if name == "hook_result":
        return result_hook()
    if name in ("hook_attn_in", "hook_cross_attn_in"):
        return attn_in_hook()
    if name == "hook_mlp_in":
        return mlp_in_hook()
    if name in ("hook_q_input", "hook_k_input", "hook_v_input"):
        pos = "key_pos" if module.kind == "cross" and name != "hook_q_input" else "pos"  # cross K/V: encoder
        return HookPoint(("batch", pos, "head", "d_model"), note=SPLIT_QKV_NOTE)
    raise ValueError(f"no optional hook point named {name!r}")


def clamp_fp16(x: Tensor) -> Tensor:
    """Hugging Face's fp16 overflow guard after every residual add: clamp to the finite range
    (1000 below the maximum once anything has overflowed)."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


def lm_loss(logits: Tensor, labels: Tensor, per_token: bool = False) -> Tensor:
    """Mean cross-entropy over label positions that are not -100 (computed in fp32); with `per_token`,
    the loss at every position `[B,D]` (0 where the label is -100)."""
    if per_token:
        return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def repeat_heads(x: Tensor, n_heads: int) -> Tensor:
    """`[B,P,d_model]` -> `[B,P,H,d_model]`: one copy per head (a new tensor, so a hook may edit one head's
    input in place). An input already per head is copied as it is."""
    if x.ndim == 4:
        return x.clone()
    return x.unsqueeze(2).expand(-1, -1, n_heads, -1).clone()


def self_attention_sublayer(
    block: nn.Module, resid: Tensor, ctx: AttentionContext, io: HookIO | None, cache: KVCache | None = None
) -> Tensor:
    """`attn(ln1(resid))`, with TransformerLens's optional per-head inputs: `hook_attn_in` (use_attn_in) and
    `attn.hook_q_input / hook_k_input / hook_v_input` (use_split_qkv_input), each normalised by ln1."""
    cfg, attn, ln = block.cfg, block.attn, block.ln1
    attn_in = block.hook_attn_in(repeat_heads(resid, cfg.n_heads), io) if cfg.use_attn_in else resid
    if not cfg.use_split_qkv_input:
        return attn(ln(attn_in, io), ctx, io, cache=cache)
    q_in = attn.hook_q_input(repeat_heads(attn_in, cfg.n_heads), io)  # [B,Q,H,d_model]
    k_in = attn.hook_k_input(repeat_heads(attn_in, cfg.n_heads), io)
    v_in = attn.hook_v_input(repeat_heads(attn_in, cfg.n_heads), io)
    return attn(ln(q_in, io), ctx, io, cache=cache, k_input=ln(k_in, io), v_input=ln(v_in, io))


def mlp_sublayer(block: nn.Module, resid: Tensor, ln: RMSNorm, io: HookIO | None) -> Tensor:
    """`mlp(ln(resid))`. `hook_mlp_in` (use_hook_mlp_in) is the pre-norm residual as only the MLP reads it
    (TransformerLens's meaning): patching it changes the MLP's input, not the residual stream."""
    mlp_in = block.hook_mlp_in(resid, io) if block.cfg.use_hook_mlp_in else resid
    return block.hook_mlp_out(block.mlp(ln(mlp_in, io), io), io)


class Embed(nn.Module):
    """Token embedding shared by encoder and decoder (T5's `shared`)."""

    def __init__(self, cfg: HookedT5Config) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))  # [d_vocab, d_model]

    def forward(self, tokens: Tensor) -> Tensor:  # [B,pos] -> [B,pos,d_model]
        return F.embedding(tokens, self.W_E)


class RMSNorm(nn.Module):
    """T5's LayerNorm: scale by the root mean square (variance in fp32), no mean subtraction, no bias."""

    def __init__(self, cfg: HookedT5Config, stack: str | None = None) -> None:
        super().__init__()
        self.hook_stack = stack  # None: inherited from the enclosing block
        self.eps = cfg.layer_norm_eps
        self.w = nn.Parameter(torch.ones(cfg.d_model, dtype=cfg.dtype))
        self.hook_scale = HookPoint(("batch", "pos", "1"))  # sqrt(mean(x^2) + eps), fp32
        self.hook_normalized = HookPoint(("batch", "pos", "d_model"))  # x / scale

    def forward(self, x: Tensor, io: HookIO | None = None, *, hooked: bool = True) -> Tensor:
        """`hooked=False`: the same numbers without passing the hook points (a readout outside the model's own
        forward, such as the diffusion lens's final norm of an intermediate layer)."""
        scale = torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if hooked:
            scale = self.hook_scale(scale, io)
        normalized = (x / scale).to(self.w.dtype)
        if hooked:
            normalized = self.hook_normalized(normalized, io)
        return self.w * normalized


@dataclass
class AttentionContext:
    """What all layers of one stack's self- or cross-attention share in one forward.

    Built once per stack (the masks are the same for every layer; in T5 so is the position bias).
    `bias_mask` is the materialised bias plus mask for layers that need explicit scores; fused
    layers use `table` and `key_padding_mask` directly. With `per_layer_bias` (UMT5) every layer
    owns a table: `table` is None, `bias_mask` holds only the mask, and each layer adds its own bias.
    """

    q_len: int
    k_len: int
    key_padding_mask: Tensor | None  # [B,K] bool, True = attend
    causal: bool
    q_offset: int | Tensor
    table: Tensor | None  # [num_buckets, H], layer 0's shared bias table; None for cross / per-layer
    bidirectional: bool
    max_distance: int
    per_layer_bias: bool = False  # each layer applies its own table (UMT5)
    bias_mask: Tensor | None = None  # [B|1, H|1, Q, K] fp32: shared position bias (if any) + additive mask
    row_has_key: Tensor | None = None  # [B|1, 1, Q, 1] bool
    materialise_all: bool = False  # the shared bias is hooked or patched, or eager impl: no layer may fuse


class Attention(nn.Module):
    """Multi-head attention without `1/sqrt(d_head)` scaling, with T5's relative position bias.

    `kind` is "encoder" (bidirectional buckets), "decoder" (causal, unidirectional buckets) or
    "cross" (decoder queries over encoder keys, no position bias). In T5 only layer 0 of a
    self-attention stack owns the `[num_buckets, H]` bias table and the `rel_pos_hook`, and the
    stack shares it; in UMT5 (`cfg.per_layer_position_bias`) every self-attention layer owns one.
    """

    def __init__(self, cfg: HookedT5Config, kind: str, has_relative_bias: bool = False) -> None:
        super().__init__()
        if kind not in ("encoder", "decoder", "cross"):
            raise ValueError(f"attention kind must be 'encoder', 'decoder' or 'cross', got {kind!r}")
        self.cfg = cfg
        self.kind = kind
        self.hook_key_stack = "decoder" if kind == "decoder" else "encoder"  # whose positions the keys are
        inner = cfg.n_heads * cfg.d_head
        self.q_proj = nn.Parameter(torch.empty(inner, cfg.d_model, dtype=cfg.dtype))  # nn.Linear layout
        self.k_proj = nn.Parameter(torch.empty(inner, cfg.d_model, dtype=cfg.dtype))
        self.v_proj = nn.Parameter(torch.empty(inner, cfg.d_model, dtype=cfg.dtype))
        self.o_proj = nn.Parameter(torch.empty(cfg.d_model, inner, dtype=cfg.dtype))
        if has_relative_bias:
            self.rel_bias_table = nn.Parameter(
                torch.empty(cfg.relative_attention_num_buckets, cfg.n_heads, dtype=cfg.dtype)
            )
            # T5: layer 0's bias, shared by the stack; UMT5: this layer's own
            note = "" if cfg.per_layer_position_bias else REL_POS_NOTE
            self.rel_pos_hook = HookPoint(("1", "head", "pos", "key_pos"), note=note)
        else:
            self.rel_bias_table = None
        # Keys and values are projected from this call's positions (self) or from the encoder output (cross).
        kv_pos = "key_pos" if kind == "cross" else "pos"
        self.hook_q = HookPoint(("batch", "pos", "head", "d_head"))
        self.hook_k = HookPoint(("batch", kv_pos, "head", "d_head"))
        self.hook_v = HookPoint(("batch", kv_pos, "head", "d_head"))
        self.hook_attn_scores = HookPoint(("batch", "head", "pos", "key_pos"))  # after bias and mask, before softmax
        self.hook_pattern = HookPoint(("batch", "head", "pos", "key_pos"))
        self.hook_z = HookPoint(("batch", "pos", "head", "d_head"))
        if cfg.use_attn_result:
            self.hook_result = result_hook()
        if cfg.use_split_qkv_input:  # per-head copies of the inputs (see self_attention_sublayer, project_kv)
            for name in ("hook_q_input", "hook_k_input", "hook_v_input"):
                setattr(self, name, optional_hook(self, name))

    # ---- TransformerLens-shaped views of the weights ----------------------------------
    @property
    def W_Q(self) -> Tensor:  # [H, d_model, d_head]
        return self.q_proj.view(self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model).transpose(1, 2)

    @property
    def W_K(self) -> Tensor:  # [H, d_model, d_head]
        return self.k_proj.view(self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model).transpose(1, 2)

    @property
    def W_V(self) -> Tensor:  # [H, d_model, d_head]
        return self.v_proj.view(self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model).transpose(1, 2)

    @property
    def W_O(self) -> Tensor:  # [H, d_head, d_model]
        return self.o_proj.T.view(self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model)

    def _zero_bias(self, *shape: int) -> Tensor:
        return torch.zeros(*shape, dtype=self.q_proj.dtype, device=self.q_proj.device)

    @property
    def b_Q(self) -> Tensor:  # [H, d_head]; T5 has no attention biases
        return self._zero_bias(self.cfg.n_heads, self.cfg.d_head)

    b_K = b_Q
    b_V = b_Q

    @property
    def b_O(self) -> Tensor:  # [d_model]
        return self._zero_bias(self.cfg.d_model)

    # ---- forward -----------------------------------------------------------------------
    def position_bias(self, q_len: int, k_len: int, q_offset: int | Tensor, io: HookIO | None) -> Tensor:
        """The bias `[1,H,Q,K]` from this layer's table, through `rel_pos_hook` (the whole stack's in T5)."""
        bias = position_bias(
            self.rel_bias_table,
            q_len,
            k_len,
            bidirectional=self.kind == "encoder",
            max_distance=self.cfg.relative_attention_max_distance,
            q_offset=q_offset,
        )
        return self.rel_pos_hook(bias, io)

    def bias_hooked(self, io: HookIO | None) -> bool:
        # has_hooks' arguments all given: a default argument becomes a guard that Dynamo cannot re-check when
        # it reuses a compile region for the next layer (regions.py), so every layer would compile its own
        return self.rel_pos_hook.has_hooks("both", True, None) or (
            io is not None and io.touches(io.key(self.rel_pos_hook))
        )

    def wants_fused(self, device: torch.device) -> bool:
        impl = self.cfg.attn_impl
        return impl == "fused" or (impl == "auto" and fuses_by_default(device))

    @property
    def owns_layer_bias(self) -> bool:
        """True when this layer applies its own bias table (UMT5 self-attention), not the stack's shared one."""
        return self.cfg.per_layer_position_bias and self.rel_bias_table is not None

    def needs_scores(self, io: HookIO | None, device: torch.device) -> bool:
        """Must this layer materialise its scores? (eager impl, or its scores/pattern, or its own bias, are
        hooked, captured or patched)"""
        if not self.wants_fused(device):
            return True
        for hp in (self.hook_attn_scores, self.hook_pattern):
            if hp.has_hooks("both", True, None) or (io is not None and io.touches(io.key(hp))):
                return True
        return self.owns_layer_bias and self.bias_hooked(io)

    def project(self, x: Tensor, weight: Tensor) -> Tensor:
        """`[B,P,d_model]` (shared by all heads) or `[B,P,H,d_model]` (per head) -> `[B,P,H,d_head]`."""
        H, d = self.cfg.n_heads, self.cfg.d_head
        if x.ndim == 4:  # per-head inputs (use_attn_in / use_split_qkv_input)
            return torch.einsum("bphm,hdm->bphd", x, weight.view(H, d, -1))
        return cpu_gemm.linear(x, weight, self.cfg.cpu_gemm).view(*x.shape[:-1], H, d)

    def project_kv(
        self, source: Tensor, io: HookIO | None = None, value_source: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Keys and values `[B,H,K,d_head]` of `source` `[B,K,d_model]` or `[B,K,H,d_model]` (through hook_k /
        hook_v); values read `value_source` when given (split inputs).

        For cross-attention this is the per-layer projection of the encoder output that incremental
        decoding computes once (and the ONNX encoder graph exports)."""
        if self.kind == "cross" and self.cfg.use_split_qkv_input:  # the encoder output, per head
            value_source = self.hook_v_input(repeat_heads(source, self.cfg.n_heads), io)
            source = self.hook_k_input(repeat_heads(source, self.cfg.n_heads), io)
        k = self.hook_k(self.project(source, self.k_proj), io).transpose(1, 2)
        v = self.hook_v(self.project(source if value_source is None else value_source, self.v_proj), io)
        return k, v.transpose(1, 2)

    def forward(
        self,
        x: Tensor,  # [B,Q,d_model] (or per head [B,Q,H,d_model]) normalised queries' residual
        ctx: AttentionContext,
        io: HookIO | None = None,
        kv_input: Tensor | None = None,  # [B,K,d_model] encoder output, for cross-attention
        cache: KVCache | None = None,
        k_input: Tensor | None = None,  # self-attention with split inputs: normalised key / value inputs
        v_input: Tensor | None = None,
    ) -> Tensor:  # [B,Q,d_model]
        B, Q = x.shape[:2]
        H, d = self.cfg.n_heads, self.cfg.d_head
        q = self.hook_q(self.project(x, self.q_proj), io)
        if self.kind == "cross" and cache is not None and cache.k is not None:
            k, v = cache.k, cache.v  # [B,H,K,d] computed at the first step
        else:
            if self.kind == "cross":
                k, v = self.project_kv(kv_input, io)
            else:
                k, v = self.project_kv(x if k_input is None else k_input, io, v_input)
            if cache is not None:
                k, v = cache.update(k, v, append=self.kind != "cross")
        q = q.transpose(1, 2)  # [B,H,Q,d]

        if ctx.materialise_all or self.needs_scores(io, x.device):
            scores = torch.matmul(q, k.transpose(-1, -2))  # [B,H,Q,K], no 1/sqrt(d) in T5
            additive = ctx.bias_mask  # [B|1,H|1,Q,K] fp32 or None
            if ctx.per_layer_bias:
                own = self.position_bias(Q, k.shape[2], ctx.q_offset, io).float()  # [1,H,Q,K]
                additive = own if additive is None else own + additive
            if additive is not None:
                scores = scores + additive
            scores = self.hook_attn_scores(scores.float(), io)
            pattern = self.hook_pattern(masked_softmax(scores, ctx.row_has_key), io)
            z = torch.matmul(pattern.to(v.dtype), v)  # [B,H,Q,d]
        else:
            from .kernels import relbias_attention

            z = relbias_attention(
                q,
                k,
                v,
                self.rel_bias_table if ctx.per_layer_bias else ctx.table,
                bidirectional=ctx.bidirectional,
                num_buckets=self.cfg.relative_attention_num_buckets,
                max_distance=ctx.max_distance,
                causal=ctx.causal,
                key_padding_mask=ctx.key_padding_mask,
                q_offset=ctx.q_offset,
                scale=1.0,
                backend=layer_backend(x.device, self.cfg.attn_impl),
            )
        z = self.hook_z(z.transpose(1, 2), io)  # [B,Q,H,d]
        if self.cfg.use_attn_result:
            result = self.hook_result(torch.einsum("bqhd,hdm->bqhm", z, self.W_O), io)  # [B,Q,H,d_model]
            return result.sum(dim=2)
        return cpu_gemm.linear(z.reshape(B, Q, H * d), self.o_proj, self.cfg.cpu_gemm)


def attention_context(
    attn0: Attention,
    layers: list[Attention],
    q_len: int,
    k_len: int,
    key_padding_mask: Tensor | None,
    io: HookIO | None,
    device: torch.device,
    q_offset: int | Tensor = 0,
) -> AttentionContext:
    """Build the shared context for one stack's attention. In T5 `attn0` owns the stack's bias table
    (self-attention); in UMT5 every self-attention layer owns its own and applies it itself."""
    causal = attn0.kind == "decoder"
    per_layer = attn0.owns_layer_bias
    table = None if per_layer else attn0.rel_bias_table
    ctx = AttentionContext(
        q_len=q_len,
        k_len=k_len,
        key_padding_mask=key_padding_mask,
        causal=causal,
        q_offset=q_offset,
        table=table,
        bidirectional=attn0.kind == "encoder",
        max_distance=attn0.cfg.relative_attention_max_distance,
        per_layer_bias=per_layer,
    )
    if table is not None:
        ctx.materialise_all = attn0.bias_hooked(io) or not attn0.wants_fused(device)
    else:
        ctx.materialise_all = not attn0.wants_fused(device)
    if ctx.materialise_all or any(layer.needs_scores(io, device) for layer in layers):
        bias = attn0.position_bias(q_len, k_len, q_offset, io) if table is not None else None
        ctx.bias_mask = bias_and_mask(
            bias, key_padding_mask, q_len, k_len, causal=causal, q_offset=q_offset, dtype=torch.float32, device=device
        )
        if key_padding_mask is not None:
            allowed = allowed_keys(key_padding_mask, q_len, k_len, causal=causal, q_offset=q_offset, device=device)
            ctx.row_has_key = rows_with_keys(allowed)
    return ctx


class MLP(nn.Module):
    """T5 feed-forward: `act(x W_in) W_out`, or gated `(act(x W_gate) * x W_in) W_out` (v1.1, mT5, ByT5)."""

    def __init__(self, cfg: HookedT5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.act = ACT_FNS[cfg.act_fn]
        if cfg.gated_mlp:
            self.gate_proj = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model, dtype=cfg.dtype))  # HF wi_0
        else:
            self.gate_proj = None
        self.in_proj = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model, dtype=cfg.dtype))  # HF wi / wi_1
        self.out_proj = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp, dtype=cfg.dtype))  # HF wo
        self.hook_pre = HookPoint(("batch", "pos", "d_mlp"))  # activation input
        if cfg.gated_mlp:
            self.hook_pre_linear = HookPoint(("batch", "pos", "d_mlp"), note=PRE_LINEAR_NOTE)  # the linear branch
        self.hook_post = HookPoint(("batch", "pos", "d_mlp"))

    @property
    def W_in(self) -> Tensor:  # [d_model, d_mlp]
        return self.in_proj.T

    @property
    def W_gate(self) -> Tensor | None:  # [d_model, d_mlp]
        return None if self.gate_proj is None else self.gate_proj.T

    @property
    def W_out(self) -> Tensor:  # [d_mlp, d_model]
        return self.out_proj.T

    @property
    def b_in(self) -> Tensor:  # [d_mlp]; T5 has no MLP biases
        return torch.zeros(self.cfg.d_mlp, dtype=self.in_proj.dtype, device=self.in_proj.device)

    @property
    def b_out(self) -> Tensor:  # [d_model]
        return torch.zeros(self.cfg.d_model, dtype=self.out_proj.dtype, device=self.out_proj.device)

    def forward(self, x: Tensor, io: HookIO | None = None) -> Tensor:
        backend = self.cfg.cpu_gemm
        if self.gate_proj is not None:
            pre = self.hook_pre(cpu_gemm.linear(x, self.gate_proj, backend), io)
            pre_linear = self.hook_pre_linear(cpu_gemm.linear(x, self.in_proj, backend), io)
            post = self.hook_post(self.act(pre) * pre_linear, io)
        else:
            pre = self.hook_pre(cpu_gemm.linear(x, self.in_proj, backend), io)
            post = self.hook_post(self.act(pre), io)
        return cpu_gemm.linear(post, self.out_proj, backend)


class EncoderBlock(nn.Module):
    """Pre-norm block: resid += attn(ln1(resid)); resid += mlp(ln2(resid))."""

    hook_stack = "encoder"

    def __init__(self, cfg: HookedT5Config, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.hook_resid_pre = HookPoint(RESID)
        if cfg.use_attn_in:
            self.hook_attn_in = attn_in_hook()
        self.ln1 = RMSNorm(cfg)
        self.attn = Attention(cfg, "encoder", has_relative_bias=layer == 0 or cfg.per_layer_position_bias)
        self.hook_attn_out = HookPoint(RESID)
        self.hook_resid_mid = HookPoint(RESID)
        self.ln2 = RMSNorm(cfg)
        if cfg.use_hook_mlp_in:
            self.hook_mlp_in = mlp_in_hook()
        self.mlp = MLP(cfg)
        self.hook_mlp_out = HookPoint(RESID)
        self.hook_resid_post = HookPoint(RESID)

    def forward(self, resid: Tensor, ctx: AttentionContext, io: HookIO | None = None) -> Tensor:
        resid = self.hook_resid_pre(resid, io)
        attn_out = self.hook_attn_out(self_attention_sublayer(self, resid, ctx, io), io)
        resid = self.hook_resid_mid(clamp_fp16(resid + attn_out), io)
        mlp_out = mlp_sublayer(self, resid, self.ln2, io)
        return self.hook_resid_post(clamp_fp16(resid + mlp_out), io)


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention over the encoder output, MLP; each pre-normed."""

    hook_stack = "decoder"

    def __init__(self, cfg: HookedT5Config, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.hook_resid_pre = HookPoint(RESID)
        if cfg.use_attn_in:
            self.hook_attn_in = attn_in_hook()
        self.ln1 = RMSNorm(cfg)
        self.attn = Attention(cfg, "decoder", has_relative_bias=layer == 0 or cfg.per_layer_position_bias)
        self.hook_attn_out = HookPoint(RESID)
        self.hook_resid_mid = HookPoint(RESID)
        if cfg.use_attn_in:
            self.hook_cross_attn_in = attn_in_hook()  # the cross-attention queries' input, per head
        self.ln2 = RMSNorm(cfg)
        self.cross_attn = Attention(cfg, "cross")
        self.hook_cross_attn_out = HookPoint(RESID)
        self.hook_resid_mid_cross = HookPoint(RESID)
        self.ln3 = RMSNorm(cfg)
        if cfg.use_hook_mlp_in:
            self.hook_mlp_in = mlp_in_hook()
        self.mlp = MLP(cfg)
        self.hook_mlp_out = HookPoint(RESID)
        self.hook_resid_post = HookPoint(RESID)

    def forward(
        self,
        resid: Tensor,  # [B,D,d_model]
        encoder_out: Tensor | None,  # [B,E,d_model]; None when the cross K/V are cached
        self_ctx: AttentionContext,
        cross_ctx: AttentionContext,
        io: HookIO | None = None,
        self_cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
    ) -> Tensor:
        cfg = self.cfg
        resid = self.hook_resid_pre(resid, io)
        attn_out = self.hook_attn_out(self_attention_sublayer(self, resid, self_ctx, io, self_cache), io)
        resid = self.hook_resid_mid(clamp_fp16(resid + attn_out), io)
        query_in = self.hook_cross_attn_in(repeat_heads(resid, cfg.n_heads), io) if cfg.use_attn_in else resid
        if cfg.use_split_qkv_input:  # keys and values: the encoder output per head, in cross_attn.project_kv
            query_in = self.cross_attn.hook_q_input(repeat_heads(query_in, cfg.n_heads), io)
        cross_out = self.cross_attn(self.ln2(query_in, io), cross_ctx, io, kv_input=encoder_out, cache=cross_cache)
        cross_out = self.hook_cross_attn_out(cross_out, io)
        resid = self.hook_resid_mid_cross(clamp_fp16(resid + cross_out), io)
        mlp_out = mlp_sublayer(self, resid, self.ln3, io)
        return self.hook_resid_post(clamp_fp16(resid + mlp_out), io)
