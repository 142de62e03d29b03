"""SAE training under a real `torchrun` (2 gloo ranks on CPU): each rank on half of every global batch, the ranks
end with bit-identical SAEs equal (fp32 round-off) to one process on the whole batches, for ReLU with dead-feature
resampling, TopK and BatchTopK with the auxiliary loss on dead latents; and a probe trained by the spliced-
intervention trainer (the runs: sae_runs.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_runs import probe_run, train_all

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run = subprocess.run([*cmd, str(ROOT / "tests" / "sae_runs.py"), str(tmp_path)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]  # the script also asserts that both ranks hold the same SAEs
    two = torch.load(tmp_path / "ranks.pt", weights_only=True)
    one = train_all()
    for arch, result in one.items():
        for name, value in result["state"].items():
            torch.testing.assert_close(two[arch]["state"][name], value, atol=1e-5, rtol=0, msg=f"{arch} {name}")
        assert [m["tokens"] for m in two[arch]["metrics"]] == [m["tokens"] for m in result["metrics"]]
        for theirs, ours in zip(two[arch]["metrics"], result["metrics"]):  # metrics over the global batch
            for key in ("sae/explained_variance", "sae/l0", "sae/dead_fraction"):
                assert abs(theirs[key] - ours[key]) < 1e-5, (arch, key)
    assert one["standard"]["metrics"][-1]["sae/resampled"] > 0  # resampling ran, from the gathered batch
    for arch in ("topk", "batchtopk"):  # latents died: the auxiliary loss ran
        assert max(m["sae/dead_fraction"] for m in one[arch]["metrics"]) > 0
    assert float(one["batchtopk"]["state"]["threshold"][0]) > 0
    for name, value in probe_run().items():  # the probe trainer under torchrun too
        torch.testing.assert_close(two["probe"]["state"][name], value, atol=1e-5, rtol=0, msg=f"probe {name}")
