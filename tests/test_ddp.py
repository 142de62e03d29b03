"""DistributedDataParallel over the capture module: 2 processes (gloo) match 1 process on the full batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # two processes, each importing torch

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "train_ddp.py"


def run(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parent.parent)}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_two_process_ddp_matches_single_process(tmp_path):
    single = run([str(SCRIPT), "--steps", "4", "--out", "single.safetensors"], tmp_path)
    ddp = run(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(SCRIPT),
            "--steps",
            "4",
            "--out",
            "ddp.safetensors",
        ],
        tmp_path,
    )
    assert "step   3" in single and "step   3" in ddp
    a, b = load_file(tmp_path / "single.safetensors"), load_file(tmp_path / "ddp.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=2e-6, rtol=1e-5, msg=name)
