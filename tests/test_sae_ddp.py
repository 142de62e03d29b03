"""SAE training under torch.distributed (as torchrun sets it up): 2 processes, each on half of every batch,
end with the same weights as 1 process on the whole batches."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from t5hooks.interventions.sae_training import SAETrainConfig, train_sae
from synthetic import planted_features

CFG = dict(
    architecture="standard",
    d_sae=24,
    l1_coefficient=0.5,
    lr=3e-3,
    total_steps=12,
    warmup_steps=2,
    metrics_every=4,
    seed=0,
)


def batches(x, rank=0, world=1, batch_size=64):
    for i in range(x.shape[0] // batch_size):
        full = x[i * batch_size : (i + 1) * batch_size]
        yield full[rank * batch_size // world : (rank + 1) * batch_size // world]


def worker(rank, world, port, x, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = train_sae(batches(x, rank, world), x.shape[1], SAETrainConfig(**CFG), progress=False)
        if rank == 0:
            torch.save(result.saes["sae"].state_dict(), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    _, x = planted_features(16, 8, 2048, active=2, seed=2)
    single = train_sae(batches(x), 8, SAETrainConfig(**CFG), progress=False).saes["sae"].state_dict()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = tmp_path / "rank0.pt"
    procs = [ctx.Process(target=worker, args=(r, 2, port, x, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    state = torch.load(out)
    for name, value in single.items():
        torch.testing.assert_close(state[name], value, atol=1e-5, rtol=1e-4, msg=name)
