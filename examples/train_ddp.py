"""Train a T5 with captured activations in the loss, data-parallel under DistributedDataParallel.

    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py --steps 20     # gloo on CPU, nccl on GPU
    python examples/train_ddp.py --steps 20                                        # one process, same result

The loss is the LM loss plus an L1 penalty on every residual stream, read from the capture
module's explicit outputs (no Python hooks, so the same module also runs under torch.compile).
Each of N processes takes 1/N of every batch; DDP averages the gradients, so the parameters
follow the single-process run on the full batch.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from t5hooks import HookedEncoderDecoder, HookedT5Config

BATCH, ENC_LEN, DEC_LEN = 8, 12, 6
L1 = 1e-2


def make_model() -> HookedEncoderDecoder:
    cfg = HookedT5Config(
        d_model=32,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        n_layers=2,
        n_decoder_layers=2,
        d_vocab=64,
        gated_mlp=True,
        act_fn="gelu_new",
        tie_word_embeddings=False,
        scale_logits=False,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        seed=0,
    )
    return HookedEncoderDecoder(cfg)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic copy task: the decoder learns to reproduce the first tokens of the input."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(3, 64, (BATCH, ENC_LEN), generator=g)
    return tokens, tokens[:, :DEC_LEN].clone()


def loss_fn(out: dict[str, torch.Tensor]) -> torch.Tensor:
    penalty = sum(t.abs().mean() for name, t in out.items() if name.endswith("hook_resid_post"))
    return out["loss"] + L1 * penalty


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--compile", action="store_true", help="torch.compile the capture module")
    parser.add_argument("--out", default=None, help="save the final parameters (safetensors)")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cpu")
    if world > 1:
        use_cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if use_cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if BATCH % world:
        raise SystemExit(f"batch {BATCH} does not split over {world} processes")

    model = make_model().to(device)
    cap = model.capture(["encoder.*.hook_resid_post", "decoder.*.hook_resid_post"])
    if args.compile:
        cap = torch.compile(cap, fullgraph=True, dynamic=True)
    train = DistributedDataParallel(cap) if world > 1 else cap
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for step in range(args.steps):
        tokens, labels = batch(step)
        out = train(tokens[shard].to(device), labels=labels[shard].to(device))
        loss = loss_fn(out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  (LM {out['loss'].item():.4f})", flush=True)
    if rank == 0 and args.out:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, args.out)
    if world > 1:
        dist.barrier()  # let rank 0 finish writing before peers tear the group down
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
