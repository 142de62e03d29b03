"""The SAE trainer against the real SAELens trainer (`sae_lens.SAETrainer`): from the same initial weights on the
same batches, with SAELens's configuration converted by `SAETrainConfig.from_saelens`, both end with the same
weights (warm-up, decay, L1 warm-up, gradient clipping, the TopK auxiliary loss on dead latents, BatchTopK's
threshold): the losses and hyper-parameters are the same. And the sparse kernels give autograd's gradients."""

import contextlib
import io

import pytest
import torch

from t5hooks.interventions.sae import build_sae
from t5hooks.interventions.sae_objective import (
    Objective,
    compiled_training_step,
    dense_training_step,
    kth_largest_in_rows,
    training_step,
)
from t5hooks.interventions.sae_training import SAETrainConfig, SAETrainer

sae_lens = pytest.importorskip("sae_lens")

D_IN, D_SAE, K, BATCH, STEPS = 16, 64, 4, 32, 24


def batches():
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(40, D_IN, generator=g)
    return [
        (torch.rand(BATCH, 40, generator=g) * (torch.rand(BATCH, 40, generator=g) < 0.1)) @ directions + 0.5
        for _ in range(STEPS)
    ]


CASES = {
    "standard-dense": ("StandardTrainingSAE", dict(l1_coefficient=0.5, l1_warm_up_steps=4), dict(sparse_below=0.0)),
    "standard-sparse": ("StandardTrainingSAE", dict(l1_coefficient=0.5, l1_warm_up_steps=4), dict(sparse_below=1.0)),
    "topk": ("TopKTrainingSAE", dict(k=K, aux_loss_coefficient=0.7), {}),
    "batchtopk": ("BatchTopKTrainingSAE", dict(k=K, aux_loss_coefficient=0.7), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_weights_as_saelens_trainer(case):
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    cls_name, sae_kwargs, changes = CASES[case]
    torch.manual_seed(0)  # SAELens's initial weights (copied into t5hooks's trainer)
    data = batches()
    sae_cfg = getattr(sae_lens, cls_name.replace("SAE", "SAEConfig"))(d_in=D_IN, d_sae=D_SAE, **sae_kwargs)
    theirs = getattr(sae_lens, cls_name)(sae_cfg)
    initial = {name: p.detach().clone() for name, p in theirs.named_parameters()}
    trainer_cfg = SAETrainerConfig(
        total_training_samples=STEPS * BATCH,
        train_batch_size_samples=BATCH,
        lr=3e-3,
        lr_end=3e-3,
        lr_warm_up_steps=3,
        lr_decay_steps=5,
        dead_feature_window=3,  # latents die within the run: the auxiliary loss is exercised
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
    )
    reference = sae_lens.SAETrainer(trainer_cfg, theirs, iter(data))
    with contextlib.redirect_stderr(io.StringIO()):
        reference.fit()

    cfg = SAETrainConfig.from_saelens(sae_cfg, trainer_cfg, **changes)
    assert cfg.b_dec_init == "zeros" and cfg.dead_after_tokens == 3 * BATCH and cfg.total_steps == STEPS
    ours = SAETrainer({"h": D_IN}, cfg)
    with torch.no_grad():
        for name, p in ours.saes["h"].named_parameters():
            if name in initial:
                p.copy_(initial[name])
    for batch in data:
        ours.train_step({"h": batch})
    sae = ours.saes["h"]
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(getattr(sae, name), p, rtol=1e-5, atol=1e-5 * float(p.abs().max()), msg=name)
    dead = int(reference.dead_neurons.sum())
    assert int(ours.dead_masks()["h"].sum()) == dead
    if case in ("topk", "batchtopk"):
        assert dead > 0  # the auxiliary loss ran
    if case == "batchtopk":
        assert float(theirs.topk_threshold) > 0
        torch.testing.assert_close(ours.threshold["h"], theirs.topk_threshold, rtol=1e-5, atol=0)
    if case == "standard-sparse":
        assert ours.density["h"] < 1.0


def test_saelens_settings_it_does_not_implement_are_refused():
    from sae_lens.config import SAETrainerConfig

    sae_cfg = sae_lens.TopKTrainingSAEConfig(d_in=8, d_sae=16, k=2, normalize_activations="expected_average_only_in")
    trainer_cfg = SAETrainerConfig(
        total_training_samples=64, train_batch_size_samples=8, lr_scheduler_name="cosineannealing"
    )
    with pytest.raises(ValueError, match="normalize_activations.*lr_scheduler_name"):
        SAETrainConfig.from_saelens(sae_cfg, trainer_cfg)


@pytest.mark.parametrize(
    "architecture,rescale,density",
    [("standard", False, 1.0), ("standard", False, 0.0), ("topk", True, 0.0), ("topk", False, 0.0),
     ("batchtopk", True, 0.0)],
)  # fmt: skip
def test_sparse_kernels_give_autograds_gradients(architecture, rescale, density):
    """The custom backward (embedding_bag, sampled products, the b_dec mat-vec) equals autograd through the
    dense formulation, auxiliary loss on dead latents included."""
    torch.manual_seed(0)
    sae = build_sae(architecture, 16, 64, k=4, rescale_acts_by_decoder_norm=rescale)
    sae.reset_parameters(seed=1, decoder_norm=0.3)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    x = torch.randn(50, 16) * 2
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    grads = []
    for run in ("kernels", "autograd"):
        if run == "kernels":
            r = training_step(sae, x, Objective(architecture, 4, 0.7, 0.5, 5), dead, 50, density=density)
            loss, fired = r.loss, r.fired
        else:
            scalars = torch.tensor([0.7, 0.5, 50.0])
            loss, _, fired, _ = dense_training_step(sae, x, dead, scalars, architecture=architecture, k=4, aux_k=5)
        sae.zero_grad()
        loss.backward()
        grads.append(({n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}, loss, fired))
    (g1, l1, f1), (g2, l2, f2) = grads
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    assert torch.equal(f1, f2) and g1.keys() == g2.keys() == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in g2:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-5, msg=name)


def test_kth_largest_from_row_candidates_is_exact():
    """BatchTopK's threshold from each row's top candidates equals a selection over every entry: spread-out rows,
    a row holding most of the top k (the fallback), ties, mostly zeros (fewer positives than k), k = 1 and k at
    the size; eagerly and compiled (both branches of the `torch.cond`)."""
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(64, 512, generator=g).relu()
    saturated = spread.clone()
    saturated[3] = 10 + torch.rand(512, generator=g)  # one row holds more than its candidates of the top k
    ties = torch.randint(0, 4, (64, 512), generator=g).float()
    sparse = spread * (torch.rand(64, 512, generator=g) < 0.02)
    compiled = torch.compile(kth_largest_in_rows, fullgraph=True, backend="aot_eager")
    for values in (spread, saturated, ties, sparse):
        for k in (1, 7, 64 * 8, 64 * 40, 64 * 512):
            expected = values.reshape(-1).kthvalue(values.numel() - k + 1).values
            assert kth_largest_in_rows(values, k) == expected, k
            assert compiled(values, k) == expected, k


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
@pytest.mark.parametrize("positives", ["many", "few"])
def test_static_shape_step_gives_autograds_gradients(architecture, positives):
    """The compiled step's formulation (sparse kernels on exactly k pairs per token, or k * N pairs for BatchTopK
    with padding when fewer pre-activations are positive) equals autograd through the dense formulation:
    loss, every gradient, fired counts and BatchTopK's threshold, auxiliary loss included."""
    torch.manual_seed(0)
    sae = build_sae(architecture, 16, 64, k=4, rescale_acts_by_decoder_norm=True)
    sae.reset_parameters(seed=1, decoder_norm=0.3)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(mean=-2.0 if positives == "few" else 0.0, std=0.1)
    x = torch.randn(50, 16) * 2
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    scalars = torch.tensor([0.0, 0.5, 50.0])
    outs = []
    for step in (compiled_training_step, dense_training_step):
        extra = {"any_dead": True} if step is compiled_training_step else {}
        loss, _, fired, threshold = step(sae, x, dead, scalars, architecture=architecture, k=4, aux_k=5, **extra)
        sae.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
        outs.append((grads, loss, fired, threshold))
    (g1, l1, f1, t1), (g2, l2, f2, t2) = outs
    assert g1.keys() == g2.keys() == {"W_enc", "b_enc", "W_dec", "b_dec"}
    if architecture == "batchtopk":
        positive = int((sae.pre_acts(x) > 0).sum())
        assert (positive < 4 * 50) == (positives == "few")  # the padded case is exercised
        torch.testing.assert_close(t1, t2)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    assert torch.equal(f1, f2)
    for name in g2:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "architecture,backend", [("standard", "aot_eager"), ("topk", "aot_eager"), ("batchtopk", "aot_eager"),
                             ("batchtopk", "inductor")],
)  # fmt: skip
def test_compiled_step_keeps_its_graphs_for_the_run_and_equals_eager(architecture, backend):
    """The compiled loss is captured once per variant (fullgraph) and reused while the learning rate, the L1
    warm-up and the dead-feature masks change every step: one graph for the ReLU SAE, two for TopK / BatchTopK
    (with and without dead features: the auxiliary loss); it trains the same SAE as the eager kernels.
    Inductor runs the sparse kernels' custom ops inside its graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    cfg = SAETrainConfig(architecture=architecture, d_sae=64, k=4, total_steps=8, warmup_steps=2, l1_warmup_steps=4,
                         dead_after_tokens=1, aux_coefficient=0.5)  # fmt: skip
    x = torch.randn(8, 48, 16, generator=torch.Generator().manual_seed(0)) + 0.3
    torch._dynamo.reset()
    counters.clear()
    compiled, eager = SAETrainer({"h": 16}, cfg, compile=backend), SAETrainer({"h": 16}, cfg)
    dead_counts = set()
    for batch in x:
        dead_counts.add(int(compiled.dead_masks()["h"].sum()))
        compiled.train_step({"h": batch})
        eager.train_step({"h": batch})
        assert compiled.metrics_row()["h/l0"] == eager.metrics_row()["h/l0"]
    if architecture != "standard":  # (the ReLU SAE's changing input is its L1 warm-up)
        assert 0 in dead_counts and len(dead_counts) > 2  # none dead, then changing masks
    assert counters["stats"]["unique_graphs"] == (1 if architecture == "standard" else 2)
    for name, value in eager.saes["h"].state_dict().items():
        torch.testing.assert_close(compiled.saes["h"].state_dict()[name], value, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_default_compiles_only_when_it_pays(monkeypatch, tmp_path):
    """compile=None (the default): a short run at this machine's default costs stays eager; when compiling is
    cheap and fast it switches after the first measured steps, to the same weights, and the compiled steps'
    measured speed-up is recorded for the next run's choice."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from t5hooks import compile_policy

    monkeypatch.setenv("T5HOOKS_COMPILE_CACHE", str(tmp_path))
    cfg = SAETrainConfig(architecture="topk", d_sae=64, k=4, total_steps=8, dead_after_tokens=10**6)
    x = torch.randn(8, 48, 16, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    counters.clear()
    eager, default = SAETrainer({"h": 16}, cfg, compile=False), SAETrainer({"h": 16}, cfg)
    for batch in x:
        eager.train_step({"h": batch})
        default.train_step({"h": batch})
    assert not default.compiling and counters["stats"]["unique_graphs"] == 0
    monkeypatch.setitem(compile_policy.DEFAULTS, ("sae", "cpu", True), (0.0, 0.0, 5.0))  # free compile, 5x faster
    switched = SAETrainer({"h": 16}, cfg)
    switched.backend = "aot_eager"  # (the graph, not inductor's code, is the point here)
    for batch in x:
        switched.train_step({"h": batch})
    assert switched.compiling and counters["stats"]["unique_graphs"] == 1
    assert "speedup" in switched.switch.record.measurements()
    for name, value in eager.saes["h"].state_dict().items():
        torch.testing.assert_close(switched.saes["h"].state_dict()[name], value, atol=1e-5, rtol=1e-5, msg=name)
