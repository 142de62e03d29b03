"""SAE runs shared by tests and the processes they start.

`train_all(rank, world)`: the distributed test's runs: standard, TopK and BatchTopK, each with dead features and
resampling on (TopK / BatchTopK also with the auxiliary loss on dead latents), each rank on its slice of every
global batch. `probe_run(rank, world)`, `das_run(rank, world)`: a probe and a DAS rotation trained the same way
(spliced_training under torchrun). `auto_compile_run(rank, world)`: the SAE trainer's switch to its compiled step,
decided by one rank for all.
`tiny_store(path)`: a small store of t5hooks-tiny activations; `CLI_ARGS`: a `t5hooks train sae --store` run on it.
`torchrun tests/sae_runs.py OUT STORE` (one launch for all of it) joins the process group as the CLI does
(`apps.common.process_group`), runs the library runs, checks that every rank holds rank 0's weights bit for bit
and saves them to OUT/ranks.pt, then runs the CLI on STORE in that group (per-rank `--batch-size 16`; rank 0
writes OUT/cli); the test repeats each in one process.
`checkpointed_run(out)`: the kill test's run (checkpoints every 4 of 14 steps, resampling, warm-up and decay).
"""

import sys
from pathlib import Path

import torch
from synthetic import planted_features
from torch import Tensor

from t5hooks.interventions import distributed
from t5hooks.interventions.sae_training import SAETrainConfig, train_sae

GLOBAL_BATCH, STEPS, D_IN = 64, 16, 8
RUNS = {
    "standard": dict(l1_coefficient=2.0, resample_every=4, dead_after_tokens=GLOBAL_BATCH),
    "topk": dict(k=2, dead_after_tokens=GLOBAL_BATCH, aux_coefficient=0.5, resample_every=5),
    "batchtopk": dict(k=2, dead_after_tokens=GLOBAL_BATCH, aux_coefficient=0.5, resample_every=5),
}


def batches(x, rank, world):
    for i in range(STEPS):
        full = x[i * GLOBAL_BATCH : (i + 1) * GLOBAL_BATCH]
        share = GLOBAL_BATCH // world
        yield full[rank * share : (rank + 1) * share]


def train_all(rank: int = 0, world: int = 1) -> dict[str, dict]:
    _, x = planted_features(16, D_IN, GLOBAL_BATCH * STEPS, active=2, seed=2)
    out = {}
    for arch, extra in RUNS.items():
        cfg = SAETrainConfig(architecture=arch, d_sae=24, lr=1e-2, total_steps=STEPS, metrics_every=4, **extra)
        result = train_sae(batches(x, rank, world), D_IN, cfg, progress=False)
        out[arch] = {"state": result.saes["sae"].state_dict(), "metrics": result.metrics}
    return out


def auto_compile_run(rank: int = 0, world: int = 1) -> dict:
    """TopK with `compile=None` where only the last rank finds, from its 3rd timed step on, that compiling pays
    (in one process: the only rank): every rank must switch at that step, since the decision is any rank's, and
    train on compiled (aot_eager) steps as one process does."""
    from unittest import mock

    from t5hooks.compile_policy import SwitchWhenPaid
    from t5hooks.interventions.sae_training import SAETrainer

    _, x = planted_features(16, D_IN, GLOBAL_BATCH * STEPS, active=2, seed=3)
    cfg = SAETrainConfig(architecture="topk", d_sae=24, lr=1e-2, total_steps=8, **RUNS["topk"])
    trainer = SAETrainer({"sae": D_IN}, cfg)
    trainer.backend = "aot_eager"  # (the graph and the switch are the point here, not inductor's code)
    switched_at = None

    def pays(switch: SwitchWhenPaid, remaining_work: float | None) -> bool:
        return rank == world - 1 and switch.steps >= 3

    with mock.patch.object(SwitchWhenPaid, "should_compile", pays):
        for step, batch in zip(range(cfg.total_steps), batches(x, rank, world)):
            trainer.train_step({"sae": batch})
            if trainer.compiling and switched_at is None:
                switched_at = step + 1  # steps run eagerly
    return {"state": trainer.saes["sae"].state_dict(), "switched_at": switched_at}


def probe_run(rank: int = 0, world: int = 1) -> dict:
    """A regression probe on t5hooks-tiny, each rank on its slice of every global batch of 8 equal-length words
    (equal token counts per rank: the ranks' mean gradient is the global batch's)."""
    from t5hooks import HookedEncoderDecoder
    from t5hooks.interventions import train_probe

    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny").requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 120, (6, 8, 5), generator=g)
    targets = torch.randn(6, 8, 5, 3, generator=g)
    share = 8 // world

    def batches():
        for t, y in zip(tokens, targets):
            sl = slice(rank * share, (rank + 1) * share)
            yield {"input": t[sl], "targets": y[sl]}

    torch.manual_seed(rank)  # different initial probes on each rank: rank 0's is broadcast
    result = train_probe(model, "encoder.1.hook_resid_post", batches(), 3, task="regression", steps=6, lr=1e-2)
    return result.interventions["encoder.1.hook_resid_post"].state_dict()


def das_run(rank: int = 0, world: int = 1) -> dict[str, dict | Tensor]:
    """DAS (rank 4 at encoder block 1's output, position 1) the same way: 8 base/source pairs per global batch,
    every label a real token (equal counts per rank)."""
    from t5hooks import HookedEncoderDecoder
    from t5hooks.interventions import train_das

    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny").requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    base, source = torch.randint(3, 120, (2, 4, 8, 5), generator=g)
    labels = torch.randint(3, 120, (4, 8, 4), generator=g)
    share = 8 // world
    sl = slice(rank * share, (rank + 1) * share)
    batches = ({"input": b[sl], "source_input": s[sl], "labels": y[sl]} for b, s, y in zip(base, source, labels))
    torch.manual_seed(rank)  # different initial rotations on each rank: rank 0's is broadcast
    result = train_das(model, "encoder.1.hook_resid_post", batches, 4, positions=[1], steps=4, lr=1e-2)
    das = result.interventions["encoder.1.hook_resid_post"]
    return {"state": das.state_dict(), "weight": das.rotation.weight.detach(), "losses": torch.tensor(result.losses)}


CLI_ARGS = ["train", "sae", "--hook", "hook_embed", "encoder.1.hook_resid_post", "--architecture", "batchtopk",
            "--d-sae", "32", "--k", "4", "--steps", "5", "--dead-after-steps", "1", "--resample-every", "2",
            "--device", "cpu"]  # fmt: skip


def tiny_store(path: Path) -> Path:
    from t5hooks import HookedEncoderDecoder
    from t5hooks.store import extract

    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny")
    words = [" ".join(["hooked", "sparse", "features", "of", "tiny", "models"][: 1 + i % 6]) for i in range(60)]
    extract(model, words, ["hook_embed", "encoder.0.hook_resid_pre", "encoder.1.hook_resid_post"], path,
            window=16, backend="eager", progress=False)  # fmt: skip
    return path


def checkpointed_run(out, resume: bool = False):
    _, x = planted_features(16, D_IN, 4096, active=2, seed=1)
    cfg = SAETrainConfig(
        architecture="standard",
        d_sae=24,
        l1_coefficient=0.5,
        lr=3e-3,
        total_steps=14,
        warmup_steps=3,
        decay_steps=4,
        resample_every=5,
        dead_after_tokens=64,
        checkpoint_every=4,
        metrics_every=2,
    )

    def cycling():
        i = 0
        while True:
            yield x[(i % 64) * 64 : (i % 64 + 1) * 64]
            i += 1

    return train_sae(cycling(), D_IN, cfg, progress=False, checkpoint_dir=out, resume=resume)


if __name__ == "__main__":
    from t5hooks.apps.cli import main
    from t5hooks.apps.common import process_group

    torch.set_num_threads(1)
    out, store = Path(sys.argv[1]), sys.argv[2]
    with process_group("cpu") as (rank, world):  # the CLI's own way into the group (gloo on CPU)
        assert (rank, world) == distributed.rank_and_world() and world == 2
        results = train_all(rank, world)
        results["probe"] = {"state": probe_run(rank, world)}
        results["das"] = das_run(rank, world)
        results["auto_compile"] = auto_compile_run(rank, world)
        for arch, result in results.items():  # every rank ends with rank 0's weights, bit for bit
            for name, value in result["state"].items():
                mine = value.clone()
                torch.distributed.broadcast(value, src=0)
                assert torch.equal(mine, value), (rank, arch, name)
        switched = torch.tensor([results["auto_compile"]["switched_at"]])
        torch.distributed.broadcast(switched, src=0)
        assert int(switched) == results["auto_compile"]["switched_at"] == 3, (rank, int(switched))
        if rank == 0:
            torch.save(results, out / "ranks.pt")
        # the CLI in the same group (re-initialising a destroyed group under torchrun is not reliable)
        if main([*CLI_ARGS, "--store", store, "--batch-size", "16", "--out", str(out / "cli")]) != 0:
            sys.exit("the CLI run failed")
