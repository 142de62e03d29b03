"""Trained interventions: DAS rotation math against pyvene's LowRankRotatedSpaceIntervention on the same
weights (outputs and gradients) and a float64 reference of the documented formula; DAS on t5hooks-tiny (the
trainer's two-pass step equals one stacked base + source forward, which also compiles whole); a linear probe learns character identity on t5hooks-tiny; a steering vector trains."""

import random

import pytest
import torch
import torch._dynamo

from t5hooks import HookedEncoderDecoder
from t5hooks.apps.reversal_task import make_batch, random_word
from t5hooks.capture import CaptureModule
from t5hooks.interventions import RotatedSubspaceInterchange, interchange_batch
from t5hooks.interventions.spliced_training import das_loss, interchange_runs, train_das, train_probe, train_steering

D, K = 12, 3


def stacked(model, batch):
    """Base and source runs stacked on the batch axis: one forward for both."""
    base, source = interchange_runs(model, batch, torch.device("cpu"))
    return {k: interchange_batch(base[k], source[k]) for k in base}


def das_module(seed=0, **kw):
    torch.manual_seed(seed)
    return RotatedSubspaceInterchange(D, K, **kw)


def test_rotation_is_orthonormal_by_parametrisation():
    das = das_module()
    opt = torch.optim.SGD(das.parameters(), lr=1.0)
    x = torch.randn(4, 5, D)
    for _ in range(3):
        opt.zero_grad()
        das(x)[0].square().sum().backward()
        opt.step()
    R = das.R.detach()
    torch.testing.assert_close(R.T @ R, torch.eye(K), atol=1e-5, rtol=0)


def test_interchange_matches_float64_reference():
    das = das_module(positions=[1, -1])
    base, source = torch.randn(2, 6, D), torch.randn(2, 6, D)
    out, side = das(interchange_batch(base, source))
    R = das.R.detach().double()
    b, s = base.double(), source.double()
    expected = b + ((s - b) @ R) @ R.T
    keep = torch.tensor([0, 2, 3, 4])  # positions not intervened on
    expected[:, keep] = b[:, keep]
    torch.testing.assert_close(out[:2].double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[2:], source)  # the source run passes through
    # in the subspace, base now reads source's coordinates at the intervened positions
    torch.testing.assert_close(side["subspace"][:, 1], (source[:, 1] @ das.R), atol=1e-5, rtol=0)


def test_matches_pyvene_low_rank_rotated_space_intervention():
    pyvene = pytest.importorskip("pyvene")
    theirs = pyvene.LowRankRotatedSpaceIntervention(embed_dim=D, low_rank_dimension=K)
    ours = das_module()
    ours.rotation.load_state_dict(theirs.rotate_layer.state_dict())  # the parametrisation's original and base
    torch.testing.assert_close(ours.R, theirs.rotate_layer.weight, atol=0, rtol=0)
    base, source = torch.randn(3, 4, D), torch.randn(3, 4, D)
    expected = theirs(base, source)
    got = ours(interchange_batch(base, source))[0][:3]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    target = torch.randn(3, 4, D)
    (expected - target).square().sum().backward()
    (got - target).square().sum().backward()
    torch.testing.assert_close(
        ours.rotation.parametrizations.weight.original.grad,
        theirs.rotate_layer.parametrizations.weight.original.grad,
        atol=1e-4,  # float32 sums of ~100 squared terms
        rtol=1e-4,
    )


@pytest.fixture(scope="module")
def tiny():
    return HookedEncoderDecoder.from_pretrained("t5hooks-tiny").requires_grad_(False)


def char_batches(model, seed=0, size=32):
    rng = random.Random(seed)
    a = model.tokenizer.encode("a")[0]
    while True:
        b = make_batch([random_word(rng) for _ in range(size)], model.tokenizer)
        targets = (b.tokens - a).masked_fill(b.mask == 0, -100)
        targets = targets.masked_fill((targets < 0) | (targets >= 26), -100)
        yield {"input": b.tokens, "one_zero_attention_mask": b.mask, "labels": b.labels, "targets": targets}


def test_probe_learns_character_identity(tiny):
    hook = "encoder.1.hook_resid_post"
    result = train_probe(tiny, hook, char_batches(tiny), 26, steps=60, lr=3e-2, compile=False)
    probe = result.interventions[hook]
    batch = next(char_batches(tiny, seed=1))
    with torch.no_grad():
        out = CaptureModule(tiny, [], intervene={hook: probe})(
            batch["input"], labels=batch["labels"], one_zero_attention_mask=batch["one_zero_attention_mask"]
        )
    pred, targets = out[f"{hook}.probe"].argmax(-1), batch["targets"]
    accuracy = (pred == targets)[targets != -100].float().mean()
    assert accuracy > 0.95
    assert all(p.grad is None for p in tiny.parameters())  # frozen base, nothing leaked


def das_batches(model, position, seed=0, size=32):
    rng = random.Random(seed)
    while True:
        words = [random_word(rng) for _ in range(size)]
        sources = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in w) for w in words]
        counterfactual = [w[:position] + s[position] + w[position + 1 :] for w, s in zip(words, sources)]
        b, s, c = (make_batch(x, model.tokenizer) for x in (words, sources, counterfactual))
        yield {
            "input": b.tokens,
            "one_zero_attention_mask": b.mask,
            "source_input": s.tokens,
            "source_attention_mask": s.mask,
            "labels": c.labels,
        }


@pytest.mark.slow
def test_das_finds_the_character_subspace(tiny):
    """Interchanging a learned subspace of the embedding at position 1 swaps that character in the reversal."""
    hook, position = "encoder.0.hook_resid_pre", 1
    result = train_das(
        tiny, hook, das_batches(tiny, position), k=32, positions=[position], steps=150, lr=1e-2, compile=False
    )
    das = result.interventions[hook]
    batch = next(das_batches(tiny, position, seed=1))
    cap = CaptureModule(tiny, [], intervene={hook: das})
    with torch.no_grad():
        out = cap(**stacked(tiny, batch))
    labels = batch["labels"]
    pred = out["logits"][: labels.shape[0]].argmax(-1)
    accuracy = ((pred == labels) | (labels == -100)).all(1).float().mean()  # interchange intervention accuracy
    assert accuracy > 0.85
    # base and source in one compiled forward: no graph break, same logits as eager
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(cap)(**stacked(tiny, batch))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(cap, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**stacked(tiny, batch))["logits"], out["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("hook", ["encoder.1.hook_resid_post", "decoder.0.hook_resid_mid"])
def test_two_pass_das_equals_the_stacked_forward(tiny, hook):
    """train_das's step (source run stopped at the hook, no autograd; then the base run) has the loss and the
    gradient of one stacked base + source forward."""
    batch = next(das_batches(tiny, 1))
    grads = []
    for mode in ("stacked", "two-pass"):
        torch.manual_seed(0)
        das = RotatedSubspaceInterchange(tiny.cfg.d_model, 4, positions=[1])
        cap = CaptureModule(tiny, [], intervene={hook: das})
        if mode == "stacked":
            out = cap(**stacked(tiny, batch))
        else:
            base, source = interchange_runs(tiny, batch, torch.device("cpu"))
            with torch.no_grad():
                das.source = CaptureModule(tiny, [hook])(**source)[hook]
            out = cap(**base)
        loss = das_loss(out, batch["labels"])
        loss.backward()
        grads.append((loss.detach(), das.rotation.parametrizations.weight.original.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-5)


def test_steering_vector_trains(tiny):
    rng = random.Random(0)

    def batches():  # steer every output character to "x"
        while True:
            words = [random_word(rng) for _ in range(16)]
            b = make_batch(words, tiny.tokenizer)
            target = make_batch(["x" * len(w) for w in words], tiny.tokenizer)
            yield {"input": b.tokens, "one_zero_attention_mask": b.mask, "labels": target.labels}

    result = train_steering(tiny, "decoder.0.hook_resid_post", batches(), steps=30, lr=5e-2, compile=False)
    assert result.losses[-1] < 0.7 * result.losses[0]


def _das_run(model, hook, compile, steps=5):
    torch.manual_seed(0)
    das = RotatedSubspaceInterchange(model.cfg.d_model, 4, positions=[1])
    batches = das_batches(model, 1, size=6)  # word lengths differ: the padded length changes between batches
    return train_das(model, hook, batches, 4, steps=steps, lr=1e-2, das=das, compile=compile)


@pytest.mark.slow
@pytest.mark.parametrize("hook", ["encoder.1.hook_resid_post", "decoder.0.hook_resid_mid"])
def test_compiled_das_trains_like_eager_without_recompiling(tiny, hook):
    """compile=True trains through `compile_capture` (regions, dynamic axes): the same losses and rotation as eager
    while the source activations, the batch's padded length and the learning-rate warm-up change every step, and
    Dynamo traces one graph for the run (a new source tensor or length is not a recompile)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _das_run(tiny, hook, False), _das_run(tiny, hook, "aot_eager")
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.interventions[hook].R, eager.interventions[hook].R, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_default_compiles_only_when_it_pays(tiny, monkeypatch, tmp_path):
    """compile=None (the default): with this machine's measured costs (minutes of compile for a few percent) a
    short run stays eager and compiles nothing; when compiling is cheap and fast it switches after the first
    measured eager steps, on the same numbers."""
    from torch._dynamo.utils import counters

    from t5hooks import compile_policy
    from t5hooks.capture import compile_capture
    from t5hooks.interventions import spliced_training

    hook = "encoder.1.hook_resid_post"
    eager = _das_run(tiny, hook, False)
    torch._dynamo.reset()
    counters.clear()
    stays = _das_run(tiny, hook, None)
    assert counters["stats"]["unique_graphs"] == 0 and stays.losses == eager.losses
    monkeypatch.setenv("T5HOOKS_COMPILE_CACHE", str(tmp_path))  # nothing measured here yet: the defaults decide
    monkeypatch.setitem(
        compile_policy.DEFAULTS, ("capture", "cpu", True), (0.0, 0.0, 5.0)
    )  # free compile, 5x faster steps
    monkeypatch.setattr(
        spliced_training, "compile_capture", lambda cap, **kw: compile_capture(cap, **{**kw, "backend": "aot_eager"})
    )
    switched = _das_run(tiny, hook, None)
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(torch.tensor(switched.losses), torch.tensor(eager.losses), atol=1e-5, rtol=1e-5)
