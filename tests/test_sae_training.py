"""SAE training: planted sparse features are recovered, several SAEs train on live activations of several hooks
from one forward, the schedule and constraints hold. (SAELens parity, kernels, checkpoints and kill tests:
test_sae_trainer_reference.py and test_sae_checkpoints.py.)"""

import random

import pytest
import torch
from synthetic import max_cosine, planted_features

from t5hooks import HookedEncoderDecoder
from t5hooks.apps.reversal_task import make_batch, random_word
from t5hooks.interventions.live import LiveActivations, ce_loss_recovered
from t5hooks.interventions.sae_training import SAETrainConfig, l1_factor, lr_factor, train_sae, train_saes


def cycling(x, batch_size):
    n = x.shape[0] // batch_size
    step = 0
    while True:
        i = step % n
        yield x[i * batch_size : (i + 1) * batch_size]
        step += 1


@pytest.mark.parametrize(
    "architecture,extra",
    [
        ("topk", {"k": 3}),
        ("batchtopk", {"k": 3}),
        ("standard", {"l1_coefficient": 0.3, "resample_every": 100, "dead_after_tokens": 5000}),
    ],
)
def test_recovers_planted_features(architecture, extra):
    torch.manual_seed(0)
    directions, x = planted_features(24, 16, 16384, active=3, seed=0)
    cfg = SAETrainConfig(architecture=architecture, d_sae=48, lr=3e-3, total_steps=400, metrics_every=100, **extra)
    result = train_sae(cycling(x, 256), 16, cfg, progress=False)
    sae = result.saes["sae"]
    cosines = max_cosine(sae.W_dec.detach(), directions)
    assert cosines.min() > 0.9, cosines
    last = result.metrics[-1]
    assert last["step"] == 400 and last["sae/explained_variance"] > 0.85
    assert 0 <= last["sae/dead_fraction"] <= 1 and last["sae/l0"] > 0
    if architecture != "standard":
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-5, rtol=0)
    if architecture == "batchtopk":  # inference: JumpReLU at the learned threshold, about k features per token
        assert float(sae.threshold.min()) > 0
        with torch.no_grad():
            l0 = (sae.encode(x[:2048]) > 0).float().sum(-1).mean()
        assert 1.5 < l0 < 6


def test_lr_and_l1_schedules():
    cfg = SAETrainConfig(total_steps=10, warmup_steps=2, decay_steps=4, l1_warmup_steps=4)
    assert [round(lr_factor(s, cfg), 3) for s in range(10)] == [0.5, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25]
    assert [l1_factor(s, cfg) for s in range(6)] == [0, 0.25, 0.5, 0.75, 1, 1]  # SAELens: 0 at the first step


def test_live_activations_several_hooks_one_forward():
    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny").requires_grad_(False)
    rng = random.Random(0)

    def token_batches():
        while True:
            b = make_batch([random_word(rng) for _ in range(16)], model.tokenizer)
            yield {"input": b.tokens, "one_zero_attention_mask": b.mask, "labels": b.labels}

    hooks = ["encoder.1.hook_resid_post", "decoder.1.hook_resid_post"]
    live = LiveActivations(model, hooks, token_batches())
    first = next(iter(live))
    assert set(first) == set(hooks) and all(t.shape[1] == 128 for t in first.values())
    cfg = SAETrainConfig(architecture="topk", d_sae=256, k=8, lr=2e-3, total_steps=60, metrics_every=30)
    eval_batch = next(token_batches())
    result = train_saes(
        live,
        {h: 128 for h in hooks},
        cfg,
        progress=False,
        evaluate=lambda saes: ce_loss_recovered(model, saes, eval_batch),
    )
    last = result.metrics[-1]
    for hook in hooks:
        assert last[f"{hook}/explained_variance"] > 0.5
        assert last[f"{hook}/ce_loss_recovered"] > 0.3
    assert result.tokens_per_second > 0


@pytest.mark.slow
def test_compiled_live_activations_equal_eager_without_recompiling():
    """`compile=` runs the capture through `compile_capture` (regions, dynamic axes): the same rows as eager for
    batches of changing size, one traced graph for all of them."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny").requires_grad_(False)
    rng = random.Random(1)
    batches = []
    for size in (5, 7, 6):
        b = make_batch([random_word(rng) for _ in range(size)], model.tokenizer)
        batches.append({"input": b.tokens, "one_zero_attention_mask": b.mask, "labels": b.labels})
    assert len({b["input"].shape for b in batches}) == 3
    hooks = ["encoder.1.hook_resid_post", "decoder.0.hook_resid_mid"]
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = (
        LiveActivations(model, hooks, batches),
        LiveActivations(model, hooks, batches, compile="aot_eager"),
    )
    for a, b in zip(eager, compiled):
        for hook in hooks:
            torch.testing.assert_close(b[hook], a[hook], atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert eager.forward is eager.capture  # the default: compiling a few batches would not pay here


@pytest.mark.slow
def test_live_activations_switch_to_compiled_once_it_pays(monkeypatch, tmp_path):
    """compile=None: the capture runs eagerly until the eager time spent repays the expected compile, then
    compiled (here a free compile with a 5x speed-up: after the first timed batch), with the same rows."""
    from t5hooks import compile_policy
    from t5hooks.capture import compile_capture
    from t5hooks.interventions import live

    monkeypatch.setenv("T5HOOKS_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setitem(compile_policy.DEFAULTS, ("capture", "cpu", False), (0.0, 0.0, 5.0))
    monkeypatch.setattr(
        live, "compile_capture", lambda cap, **kw: compile_capture(cap, **{**kw, "backend": "aot_eager"})
    )
    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny").requires_grad_(False)
    rng = random.Random(2)
    batches = []
    for _ in range(6):
        b = make_batch([random_word(rng) for _ in range(4)], model.tokenizer)
        batches.append({"input": b.tokens, "one_zero_attention_mask": b.mask, "labels": b.labels})
    hooks = ["encoder.1.hook_resid_post"]
    auto, eager = LiveActivations(model, hooks, batches), LiveActivations(model, hooks, batches, compile=False)
    ran = []
    for batch in batches:
        ran.append("compiled" if auto.forward is auto.compiled else "eager")
        a, b = auto.activations(batch), eager.activations(batch)
        torch.testing.assert_close(a[hooks[0]], b[hooks[0]], atol=1e-5, rtol=1e-5)
    assert ran == ["eager", "eager", "compiled", "compiled", "compiled", "compiled"]
    assert "speedup" in auto.switch.record.measurements()  # the compiled batches' speed-up, for the next run


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_training_starts_near_a_sensible_reconstruction(architecture):
    """Decoder rows start at norm 0.1 (SAELens's init) and the decoder bias at the data mean: the first step's
    reconstruction explains about nothing instead of being several times the input (EV far below 0)."""
    _, x = planted_features(256, 64, 2048, active=8, seed=3)
    x = x + 2.0  # a mean offset, as residual streams have
    cfg = SAETrainConfig(architecture=architecture, d_sae=1024, k=16, total_steps=1, metrics_every=1)
    first = train_sae([x], 64, cfg, progress=False).metrics[0]["sae/explained_variance"]
    assert -0.2 < first < 0.5, first
