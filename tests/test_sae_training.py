"""SAE training: planted sparse features are recovered, a killed run resumes to the same weights, several SAEs
train on live activations of several hooks from one forward, the schedule and constraints hold."""

import json
import random

import pytest
import torch

from t5hooks import HookedEncoderDecoder
from t5hooks.apps.reversal_task import make_batch, random_word
from t5hooks.interventions.live import LiveActivations, ce_loss_recovered
from t5hooks.interventions.sae_training import SAETrainConfig, lr_factor, train_sae, train_saes
from t5hooks.interventions.saelens_format import load_saelens
from t5hooks.interventions.synthetic import max_cosine, planted_features


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


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    _, x = planted_features(16, 8, 4096, active=2, seed=1)
    cfg = SAETrainConfig(
        architecture="standard",
        d_sae=24,
        l1_coefficient=0.5,
        total_steps=14,
        warmup_steps=3,
        decay_steps=4,
        resample_every=5,
        dead_after_tokens=64,
        checkpoint_every=4,
        metrics_every=2,
    )
    full = train_sae(cycling(x, 64), 8, cfg, progress=False, checkpoint_dir=tmp_path / "full")

    class Killed(Exception):
        pass

    def kill_at_7(step):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        train_sae(cycling(x, 64), 8, cfg, progress=False, checkpoint_dir=tmp_path / "cut", on_step=kill_at_7)
    resumed = train_sae(cycling(x, 64), 8, cfg, progress=False, checkpoint_dir=tmp_path / "cut", resume=True)
    for name, value in full.saes["sae"].state_dict().items():
        torch.testing.assert_close(resumed.saes["sae"].state_dict()[name], value, atol=0, rtol=0, msg=name)
    assert [m["step"] for m in resumed.metrics] == [m["step"] for m in full.metrics]  # none lost, none repeated
    saved = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert [m["step"] for m in saved] == list(range(2, 15, 2))
    reloaded = load_saelens(tmp_path / "cut" / "sae")
    torch.testing.assert_close(reloaded.W_dec, full.saes["sae"].W_dec.detach(), atol=0, rtol=0)


def test_lr_schedule():
    cfg = SAETrainConfig(total_steps=10, warmup_steps=2, decay_steps=4)
    assert [round(lr_factor(s, cfg), 3) for s in range(10)] == [0.5, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25]


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
