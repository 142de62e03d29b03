"""Training under a real `torchrun` (2 gloo ranks on CPU), one launch for everything (the runs: sae_runs.py).

Library: each rank on half of every global batch, the ranks end with bit-identical SAEs equal (fp32 round-off) to
one process on the whole batches, for ReLU, TopK and BatchTopK, all with dead-feature resampling on (TopK /
BatchTopK also with the auxiliary loss on dead latents; BatchTopK's batch-level top k and inference threshold
global); a probe and a DAS rotation trained by the spliced-intervention trainers; and the SAE trainer's switch to
compiled steps (compile=None) decided by one rank for both.
CLI (its `main` in the same launch, in the group joined as the CLI joins it): `t5hooks train sae --store ...
--batch-size 16` on 2 ranks equals one process with
`--batch-size 32`: the same SAEs and metrics (which count both ranks' tokens); rank 0 alone reports and writes."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_runs import CLI_ARGS, auto_compile_run, das_run, probe_run, tiny_store, train_all

from t5hooks.apps.cli import main
from t5hooks.interventions import load_saelens

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, capsys):
    store = str(tiny_store(tmp_path / "acts"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run = subprocess.run([*cmd, str(ROOT / "tests" / "sae_runs.py"), str(tmp_path), store], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]  # the script also asserts that both ranks hold the same SAEs

    # the library's trainers
    two = torch.load(tmp_path / "ranks.pt", weights_only=True)
    one = train_all()
    for arch, result in one.items():
        for name, value in result["state"].items():
            torch.testing.assert_close(two[arch]["state"][name], value, atol=1e-5, rtol=0, msg=f"{arch} {name}")
        assert [m["tokens"] for m in two[arch]["metrics"]] == [m["tokens"] for m in result["metrics"]]
        for theirs, ours in zip(two[arch]["metrics"], result["metrics"]):  # metrics over the global batch
            for key in ("sae/explained_variance", "sae/l0", "sae/dead_fraction", "sae/resampled"):
                assert abs(theirs[key] - ours[key]) < 1e-5, (arch, key)
        assert result["metrics"][-1]["sae/resampled"] > 0, arch  # resampling ran, from the gathered batch
    for arch in ("topk", "batchtopk"):  # latents died: the auxiliary loss ran
        assert max(m["sae/dead_fraction"] for m in one[arch]["metrics"]) > 0
    assert float(one["batchtopk"]["state"]["threshold"][0]) > 0
    for name, value in probe_run().items():  # the spliced-intervention trainers too
        torch.testing.assert_close(two["probe"]["state"][name], value, atol=1e-5, rtol=0, msg=f"probe {name}")
    # DAS: the same start and the same global loss; after that Adam's first steps are lr * sign(gradient), so
    # components whose gradient is zero up to round-off move by +-lr in either run and the rotations part at
    # ~1e-2 (measured 0.013) while the losses stay within 2e-4: compared by loss (the ranks agree bit for bit)
    auto = auto_compile_run()  # the switch to compiled steps, decided by rank 1 alone there: both ranks switched
    assert auto["switched_at"] == two["auto_compile"]["switched_at"] == 3  # after 3 eager steps, as one process
    for name, value in auto["state"].items():
        torch.testing.assert_close(two["auto_compile"]["state"][name], value, atol=1e-5, rtol=0, msg=f"auto {name}")
    das = das_run()
    torch.testing.assert_close(two["das"]["losses"][0], das["losses"][0], rtol=1e-6, atol=0)  # the global mean
    torch.testing.assert_close(two["das"]["losses"], das["losses"], rtol=1e-3, atol=0)

    # the CLI as a torchrun program
    assert run.stdout.count("tokens/s over 2 ranks") == 1  # rank 0 alone reports
    assert main([*CLI_ARGS, "--store", store, "--batch-size", "32", "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    cli_two = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    cli_one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert [m["tokens"] for m in cli_two] == [m["tokens"] for m in cli_one] == [5 * 32]
    assert cli_one[-1]["hook_embed/resampled"] > 0 and cli_one[-1]["encoder.1.hook_resid_post/resampled"] > 0
    for key, value in cli_one[-1].items():  # fp32 round-off (the loss, a sum over d_in, is in the hundreds)
        assert math.isclose(cli_two[-1][key], value, rel_tol=1e-6, abs_tol=1e-5), (key, cli_two[-1][key], value)
    for hook in ("hook_embed", "encoder.1.hook_resid_post"):
        a, b = load_saelens(tmp_path / "cli" / hook), load_saelens(tmp_path / "one" / hook)
        for name, value in b.state_dict().items():
            torch.testing.assert_close(a.state_dict()[name], value, atol=1e-5, rtol=0, msg=f"{hook} {name}")
