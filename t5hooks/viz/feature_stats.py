"""Per-feature statistics of SAE activations gathered in one streaming pass, in memory independent of the
number of tokens: exact count, sum, min and max of the active values; the running top-k activations; a
uniform reservoir sample of active tokens; a log-bucket histogram (the quantile sketch). Every kept example
carries its context window: the feature's activation and the token id at each position around it.

Only the nonzero entries of a chunk are touched after one `nonzero()` pass, so the cost is the SAE's
encoding plus a term in the number of active (token, feature) pairs.

The sketch: a positive float32's bits, shifted, give its octave and `2**SUB_BITS` linear sub-buckets per octave
(width at most 1/16 of the value), over 2**-24 .. 2**24 (values outside land in the end buckets). Counts are
exact; a quantile read from it is within one bucket of the true one (then clamped to the exact min / max).
The reservoir: every token gets one uniform key (seeded); each feature keeps its `reservoir` active tokens with
the smallest keys, a uniform sample without replacement of its active tokens, so equal-mass quantile bins
each receive about `reservoir / bins` of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SUB_BITS = 4
LOW_EXP, HIGH_EXP = -24, 24  # bucketed range 2**LOW_EXP .. 2**HIGH_EXP
N_BUCKETS = (HIGH_EXP - LOW_EXP) << SUB_BITS
_SHIFT = 23 - SUB_BITS
_OFFSET = (127 + LOW_EXP) << SUB_BITS


def bucket_of(values: Tensor) -> Tensor:  # float32 [n] (positive) -> int64 [n]
    bits = values.contiguous().view(torch.int32) >> _SHIFT
    return (bits.long() - _OFFSET).clamp_(0, N_BUCKETS - 1)


def bucket_edges() -> Tensor:  # float32 [N_BUCKETS + 1]: lower edge of each bucket, then the top edge
    bits = (torch.arange(N_BUCKETS + 1, dtype=torch.int64) + _OFFSET) << _SHIFT
    return bits.to(torch.int32).view(torch.float32)


@dataclass
class Context:
    """Where a chunk's rows come from: one shard's index columns (whole shard) and the chunk's rows in it."""

    doc: Tensor  # int64 [shard rows]
    pos: Tensor  # int32 [shard rows]
    token_id: Tensor  # int32 [shard rows]
    start: int  # shard row of the chunk's first row
    ext_start: int  # shard row of feats_ext's first row (start minus the halo before it)


class FeatureStats:
    """Running statistics of `d_sae` features (see module doc). `update` takes each chunk once; the public
    tensors are the result (on `device`)."""

    def __init__(
        self,
        d_sae: int,
        *,
        top_k: int = 20,
        reservoir: int = 60,
        before: int = 10,
        after: int = 4,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if top_k < 1 or reservoir < 0 or before < 0 or after < 0:
            raise ValueError(
                f"top_k must be >= 1 and reservoir, before, after >= 0 (got {top_k}, {reservoir}, {before}, {after})"
            )
        F, dev = d_sae, torch.device(device)
        self.d_sae, self.top_k, self.reservoir, self.before, self.after = F, top_k, reservoir, before, after
        self.width = before + after + 1
        self.device = dev
        self.n_tokens = 0
        self.sum = torch.zeros(F, dtype=torch.float64, device=dev)
        self.min = torch.full((F,), float("inf"), device=dev)
        self.max = torch.zeros(F, device=dev)  # features are >= 0; 0 = never active
        self.sketch = torch.zeros(F * N_BUCKETS, dtype=torch.int64, device=dev)
        self.top = _Slots(F, top_k, self.width, torch.float32, float("-inf"), dev)
        self.sample = _Slots(F, reservoir, self.width, torch.float64, float("inf"), dev)
        self._gen = torch.Generator(device="cpu").manual_seed(seed)

    def compact(self) -> None:
        """Merge queued top-k and reservoir candidates (before reading `top` / `sample`)."""
        self.top.compact()
        self.sample.compact()

    @property
    def counts(self) -> Tensor:  # int64 [F] active tokens per feature
        return self.sketch.view(self.d_sae, N_BUCKETS).sum(1)

    def update(self, feats_ext: Tensor, n: int, ctx: Context) -> None:
        """Fold in one chunk: `feats_ext` `[halo_before + n + halo_after, F]` holds the features of shard rows
        `ctx.ext_start ..`; the chunk proper is its `n` rows from shard row `ctx.start`."""
        off = ctx.start - ctx.ext_start
        own = feats_ext[off : off + n]
        keys = torch.rand(n, generator=self._gen, dtype=torch.float64).to(self.device)  # one key per token
        self.n_tokens += n
        r, f = own.nonzero(as_tuple=True)  # the active (token, feature) pairs
        if not len(r):
            return
        v = own[r, f].float()
        self.sum.index_add_(0, f, v.double())
        self.min.scatter_reduce_(0, f, v, "amin")
        self.max.scatter_reduce_(0, f, v, "amax")
        self.sketch.index_add_(0, f * N_BUCKETS + bucket_of(v), torch.ones_like(f))
        window = lambda rows, feats: self._windows(feats_ext, off + rows, feats, ctx)
        better = v > self.top.threshold()[f]
        self.top.offer(f[better], v[better], v[better], r[better], window, descending=True, ctx=ctx)
        if self.reservoir:
            kr = keys[r]
            chosen = kr < self.sample.threshold()[f]
            self.sample.offer(f[chosen], kr[chosen], v[chosen], r[chosen], window, descending=False, ctx=ctx)

    def _windows(self, feats_ext: Tensor, ext_rows: Tensor, feats: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        """The context of each (row, feature): activations `[m, W]` (NaN outside the document) and token ids
        `[m, W]` (-1 outside)."""
        span = torch.arange(-self.before, self.after + 1, device=ext_rows.device)
        rows = ext_rows[:, None] + span  # rows of feats_ext
        shard_rows = rows + ctx.ext_start
        n_shard = len(ctx.doc)
        inside = (shard_rows >= 0) & (shard_rows < n_shard)
        shard_rows_c = shard_rows.clamp(0, n_shard - 1).cpu()
        centre = (ext_rows + ctx.ext_start).cpu()
        same_doc = (ctx.doc[shard_rows_c] == ctx.doc[centre][:, None]).to(rows.device)
        valid = inside & same_doc
        acts = feats_ext[rows.clamp(0, len(feats_ext) - 1), feats[:, None]].float()
        acts = torch.where(valid, acts, torch.full_like(acts, float("nan")))
        tokens = torch.where(valid, ctx.token_id[shard_rows_c].to(rows.device), torch.full_like(rows, -1)).int()
        return acts, tokens


class _Slots:
    """`slots` kept entries per feature, ordered by a key (largest first for top-k, smallest for the
    reservoir): key, activation, doc, pos and the context window of each. Candidates wait in a buffer and are
    merged in (one sort over all features) when it holds about as many entries as the slots: the per-chunk
    cost stays proportional to the candidates, not to `d_sae * slots`. Call `compact()` before reading."""

    FIELDS = ("key", "value", "doc", "pos", "acts", "tokens")

    def __init__(self, F: int, slots: int, width: int, key_dtype: torch.dtype, empty: float, dev: torch.device):
        self.F, self.slots, self.empty = F, slots, empty
        self.key = torch.full((F, slots), empty, dtype=key_dtype, device=dev)
        self.value = torch.zeros(F, slots, device=dev)
        self.doc = torch.full((F, slots), -1, dtype=torch.int64, device=dev)
        self.pos = torch.full((F, slots), -1, dtype=torch.int32, device=dev)
        self.acts = torch.full((F, slots, width), float("nan"), device=dev)
        self.tokens = torch.full((F, slots, width), -1, dtype=torch.int32, device=dev)
        self._pending: list[dict[str, Tensor]] = []
        self._pending_rows = 0
        self._descending = True

    def threshold(self) -> Tensor:  # [F] the key a newcomer must beat (kept entries only: candidates are a superset)
        if self.slots == 0:
            return self.key.new_full((self.F,), self.empty)
        return self.key[:, -1]

    @property
    def filled(self) -> Tensor:  # bool [F, slots]
        return torch.isfinite(self.key)

    def offer(self, f, key, value, rows, window, *, descending: bool, ctx: Context) -> None:
        """Queue candidates (feature `f`, `key`, `value`, chunk `rows`) with their context windows."""
        if not len(f) or self.slots == 0:
            return
        self._descending = descending
        acts, tokens = window(rows, f)
        shard_rows = (rows + ctx.start).cpu()
        dev = self.key.device
        self._pending.append(
            {
                "f": f,
                "key": key.to(self.key.dtype),
                "value": value.to(self.value.dtype),
                "doc": ctx.doc[shard_rows].to(dev),
                "pos": ctx.pos[shard_rows].to(dev),
                "acts": acts,
                "tokens": tokens,
            }
        )
        self._pending_rows += len(f)
        if self._pending_rows >= max(self.F * self.slots, 1 << 16):
            self.compact()

    def compact(self) -> None:
        """Merge the queued candidates into the kept entries (the best `slots` per feature by key)."""
        if not self._pending:
            return
        pending = {k: torch.cat([p[k] for p in self._pending]) for k in ("f", *self.FIELDS)}
        self._pending, self._pending_rows = [], 0
        F, S, dev = self.F, self.slots, self.key.device
        f = pending["f"]
        all_key = torch.cat([self.key.reshape(-1), pending["key"]])
        all_f = torch.cat([torch.arange(F, device=dev).repeat_interleave(S), f])
        order = torch.argsort(all_key, descending=self._descending, stable=True)
        order = order[torch.argsort(all_f[order], stable=True)]  # by feature, then key; ties keep the older
        f_sorted = all_f[order]
        rank = (
            torch.arange(len(order), device=dev) - torch.searchsorted(f_sorted, torch.arange(F, device=dev))[f_sorted]
        )
        keep = rank < S  # exactly S per feature (the old slots, empty ones included, count)
        order, slot = order[keep], f_sorted[keep] * S + rank[keep]
        old = order < F * S
        src, cand = order[old], order[~old] - F * S
        for name in self.FIELDS:
            current = getattr(self, name)
            flat = current.reshape(F * S, *current.shape[2:])
            merged = torch.empty_like(flat)
            merged[slot[old]] = flat[src]
            merged[slot[~old]] = pending[name][cand]
            setattr(self, name, merged.view(current.shape))
