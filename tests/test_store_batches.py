"""Training batches from an activation store: several hooks row-aligned in one pass, a seeded bounded shuffle
independent of the batch size, each rank's slice of every global batch (N ranks = one process with N times the
batch), a cheap skip for resuming, every stored row at most once per pass, bf16 stores."""

from collections import Counter
from itertools import islice

import pytest
import torch

from t5hooks import HookedEncoderDecoder
from t5hooks.store import ActivationStore, extract

HOOKS = ["hook_embed", "encoder.0.hook_resid_pre", "encoder.1.hook_mlp_out", "decoder.0.hook_resid_post"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny")
    texts = [("alpha beta gamma delta " * (1 + i % 4))[: 3 + (7 * i) % 40] for i in range(48)]
    decoder = [{"text": t, "target": t[::-1][:5]} for t in texts]  # decoder rows too (teacher forced)
    path = tmp_path_factory.mktemp("store") / "acts"
    import json

    jsonl = path.parent / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in decoder) + "\n")
    extract(model, jsonl, HOOKS, path, decoder_field="target", window=7, backend="eager", progress=False)
    return ActivationStore(path)


def rows(t):
    return Counter(tuple(r.tolist()) for r in t)


def test_hooks_of_one_stream_are_row_aligned_and_each_row_comes_once(store):
    batches = list(store.batches(HOOKS[:3], 16, seed=3, buffer_rows=50))
    assert len(batches) == store.num_rows("hook_embed") // 16 > 3
    for b in batches:
        assert set(b) == set(HOOKS[:3]) and b["hook_embed"].shape == (16, 128)
        assert torch.equal(b["hook_embed"], b["encoder.0.hook_resid_pre"])  # the same tokens, the same rows
    seen = torch.cat([b["encoder.1.hook_mlp_out"] for b in batches])
    stored = store.load("encoder.1.hook_mlp_out")["acts"]
    assert not rows(seen) - rows(stored)  # nothing invented, nothing twice
    assert not torch.equal(seen, stored[: len(seen)])  # shuffled
    # two streams: each hook's batches come from its own stream; the pass ends with the shorter one
    mixed = list(store.batches(["hook_embed", "decoder.0.hook_resid_post"], 8, seed=3))
    assert len(mixed) == min(store.num_rows(h) // 8 for h in ("hook_embed", "decoder.0.hook_resid_post"))


def test_ranks_slice_the_global_batches_of_one_process(store):
    one = list(store.batches(HOOKS[2], 24, seed=1, buffer_rows=40))
    ranks = [list(store.batches(HOOKS[2], 8, seed=1, buffer_rows=40, rank=r, world_size=3)) for r in range(3)]
    assert len(ranks[0]) == len(ranks[1]) == len(ranks[2]) == len(one)
    for i, full in enumerate(one):
        assert torch.equal(torch.cat([ranks[r][i] for r in range(3)]), full)
    # the stream does not depend on the batch size either
    assert torch.equal(torch.cat(list(store.batches(HOOKS[2], 12, seed=1, buffer_rows=40)))[:48], torch.cat(one)[:48])
    again = list(store.batches(HOOKS[2], 24, seed=1, buffer_rows=40))
    other = list(store.batches(HOOKS[2], 24, seed=2, buffer_rows=40))
    assert all(torch.equal(a, b) for a, b in zip(one, again)) and not torch.equal(one[0], other[0])


def test_skip_equals_reading_and_dropping_and_epochs_reshuffle(store):
    batches = store.batches(HOOKS[:2], 16, seed=0, epochs=3)
    n = len(batches)
    assert n == 3 * (store.num_rows("hook_embed") // 16)
    full = list(batches)
    for k in (1, n // 3, n // 3 + 2):
        skipped = list(batches.skip(k))
        assert len(skipped) == len(batches.skip(k)) == n - k
        assert all(torch.equal(a[h], b[h]) for a, b in zip(skipped, full[k:]) for h in a)
    per_epoch = n // 3
    assert not torch.equal(full[0]["hook_embed"], full[per_epoch]["hook_embed"])  # a new order each epoch
    assert list(islice(batches, 2))[1]["hook_embed"].shape == (16, 128)


def test_bf16_store_and_bad_arguments(store, tmp_path):
    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny")
    extract(model, ["one two", "three four five"], "hook_embed", tmp_path / "bf16", dtype="bf16", backend="eager",
            progress=False)  # fmt: skip
    bf16 = ActivationStore(tmp_path / "bf16")
    (batch,) = list(bf16.batches("hook_embed", bf16.num_rows("hook_embed"), dtype=torch.float32))
    assert batch.dtype == torch.float32
    assert not rows(batch) - rows(bf16.load("hook_embed")["acts"].float())
    with pytest.raises(ValueError, match="no hook"):
        store.batches("encoder.0.hook_mlp_out", 4)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        store.batches("hook_embed", 0)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        store.batches("hook_embed", 4, rank=2, world_size=2)
