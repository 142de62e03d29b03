"""One table of tile sizes and launch options for every kernel (fixed, so results are reproducible across
processes: the table gradient's reduction order depends on the key tiles).

Regimes: "interpreted" (Triton's CPU interpreter: 16x16 tiles, so that short test sequences still span
several tiles, near and far), "fp32" (the correctness path: true-fp32 dot products are register-hungry,
so small tiles), "16bit" (fp16 / bf16, the fast path).

16-bit choices, compiled for sm_90 and sm_80: the forward holds 128 queries against 64 keys (32 at
d=128) with 8 warps, which keeps the fp32 accumulators in registers and stays under A100's shared
memory (4 warps spill); `dkdv` holds 128 keys against 32-query tiles and `dq` 128 queries against
32-key tiles (the shapes of the Triton fused-attention tutorial), no spills on sm_90 at d=64 and
d=128, while sm_8x needs 64-key `dkdv` tiles at d=128. Decode reads 16 KiB of bf16 K per tile.
"""

from __future__ import annotations

import torch

#: Explicit, so numerics do not change with Triton's default (FMA contraction; Triton 3.10 flips it).
COMPILE_OPTIONS = dict(enable_fp_fusion=True)

# kernel -> regime -> tiles and launch options. BLOCK_M: query rows per tile, BLOCK_N: keys per tile.
TILES: dict[str, dict[str, dict]] = {
    "forward": {
        "interpreted": dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1),
        "fp32": dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
        "16bit": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    },
    "delta": {
        "interpreted": dict(BLOCK_M=16),
        "fp32": dict(BLOCK_M=64),
        "16bit": dict(BLOCK_M=64),
    },
    "dkdv": {
        "interpreted": dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1),
        "fp32": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2),
        "16bit": dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
    },
    "dq": {
        "interpreted": dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1),
        "fp32": dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
        "16bit": dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3),
    },
    # programs_target: split programs to aim for (None: four per SM of the device)
    "decode": {
        "interpreted": dict(BLOCK_N=16, num_warps=1, num_stages=1, programs_target=16),
        "fp32": dict(BLOCK_N=None, num_warps=4, num_stages=3, programs_target=None),
        "16bit": dict(BLOCK_N=None, num_warps=4, num_stages=3, programs_target=None),
    },
    "combine": {
        "interpreted": dict(num_warps=1),
        "fp32": dict(num_warps=4),
        "16bit": dict(num_warps=4),
    },
}

# Wide heads (d > 64) on the 16-bit path: smaller key tiles where registers or shared memory run out.
WIDE_HEAD = {"forward": dict(BLOCK_N=32)}
WIDE_HEAD_PRE_HOPPER = {"dkdv": dict(BLOCK_N=64)}


def block_d(head_dim: int) -> int:
    """The head dimension padded to a power of two, at least 16 (what `tl.dot` needs)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def regime(dtype: torch.dtype, interpreted: bool) -> str:
    if interpreted:
        return "interpreted"
    return "fp32" if dtype == torch.float32 else "16bit"


def tiles(
    kernel: str, head_dim: int, dtype: torch.dtype, interpreted: bool, device: torch.device | None = None
) -> dict:
    """Tile sizes (BLOCK_M / BLOCK_N / BLOCK_D) and launch options of `kernel` for these inputs."""
    which = regime(dtype, interpreted)
    cfg = dict(TILES[kernel][which], BLOCK_D=block_d(head_dim))
    if which == "16bit" and cfg["BLOCK_D"] > 64:
        cfg.update(WIDE_HEAD.get(kernel, {}))
        if kernel in WIDE_HEAD_PRE_HOPPER and torch.cuda.get_device_capability(device)[0] < 9:
            cfg.update(WIDE_HEAD_PRE_HOPPER[kernel])
    if kernel == "decode" and cfg["BLOCK_N"] is None:
        cfg["BLOCK_N"] = max(16, 8192 // cfg["BLOCK_D"])  # 16 KiB of bf16 K per tile
    return cfg


def launch_options(cfg: dict) -> dict:
    """The launch keywords of a tile config (warps, stages, compile options)."""
    return {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg} | COMPILE_OPTIONS
