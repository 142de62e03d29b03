"""SAE training checkpoints: killed (SIGKILL, a real child process) at each write of a checkpoint, the run resumes
to the uninterrupted result bit for bit; checkpoints load with weights_only=True and one that would run code is
refused; resuming checks the configuration."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_runs import checkpointed_run

from t5hooks.interventions.sae_training import SAETrainConfig, load_checkpoint, train_sae
from t5hooks.interventions.saelens_format import load_saelens

ROOT = Path(__file__).resolve().parent.parent

# A child process imports torch once, then for each kill point forks a process that runs checkpointed_run with
# atomic's commit point (the rename of a finished temporary file onto its final name) patched: at the n-th rename
# onto `target` that process SIGKILLs itself, before or after renaming. The child reports how each one ended.
KILL_CHILD = """
import os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from t5hooks import atomic
from sae_runs import checkpointed_run

real_rename = atomic._rename
for point in sys.argv[2:]:
    target, nth, when = point.split(":")
    pid = os.fork()
    if pid == 0:
        seen = [0]

        def rename(src, dst):
            hit = Path(dst).name == target
            if hit:
                seen[0] += 1
                if seen[0] == int(nth) and when == "before":
                    os.kill(os.getpid(), signal.SIGKILL)
            real_rename(src, dst)
            if hit and seen[0] == int(nth) and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)

        atomic._rename = rename
        checkpointed_run(Path(sys.argv[1]) / point.replace(":", "-"))
        os._exit(0)  # not killed: the test fails on this status
    _, status = os.waitpid(pid, 0)
    print(point, os.WTERMSIG(status) if os.WIFSIGNALED(status) else "exit", flush=True)
"""

KILL_POINTS = [
    "checkpoint.pt:2:before",  # the step-8 checkpoint written, not yet in place: resume from step 4
    "checkpoint.pt:2:after",  # in place, metrics.json still at step 4: the checkpoint's metrics win
    "sae_weights.safetensors:1:before",  # training finished, the SAELens folder not yet written
    "cfg.json:1:before",  # the SAELens weights written, their cfg.json not
]


@pytest.mark.slow
def test_sigkill_at_each_checkpoint_write_then_resume_equals_uninterrupted(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", KILL_CHILD, str(tmp_path), *KILL_POINTS], env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split() == [w for p in KILL_POINTS for w in (p, "9")], child.stdout  # each one SIGKILLed
    full = checkpointed_run(tmp_path / "full")
    for point in KILL_POINTS:
        out = tmp_path / point.replace(":", "-")
        resumed = checkpointed_run(out, resume=True)
        for name, value in full.saes["sae"].state_dict().items():
            assert torch.equal(resumed.saes["sae"].state_dict()[name], value), (point, name)
        assert resumed.metrics == full.metrics  # none lost, none repeated
        assert torch.equal(load_saelens(out / "sae").W_dec, full.saes["sae"].W_dec)
        assert not [p.name for p in out.rglob("*") if ".tmp-" in p.name]  # the killed writer's temp file is gone


def small_run(out, **changes):
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    cfg = SAETrainConfig(**{"architecture": "topk", "d_sae": 16, "k": 2, "total_steps": 4, "metrics_every": 2,
                            "checkpoint_every": 2, **changes})  # fmt: skip
    return cfg, train_sae(iter(x.split(64)), 8, cfg, progress=False, checkpoint_dir=out, resume=True)


class Payload:
    def __reduce__(self):  # unpickling this would create a file
        return (open, (str(Path(os.environ["T5HOOKS_TEST_MARKER"])), "w"))


def test_checkpoint_holds_plain_values_and_code_is_refused(tmp_path, monkeypatch):
    _, result = small_run(tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")  # weights_only=True inside
    assert state["step"] == 4 and state["config"]["k"] == 2 and len(state["metrics"]) == 2
    marker = tmp_path / "pwned"
    monkeypatch.setenv("T5HOOKS_TEST_MARKER", str(marker))
    evil = tmp_path / "evil" / "checkpoint.pt"
    evil.parent.mkdir()
    torch.save({**state, "extra": Payload()}, evil)
    with pytest.raises(ValueError, match=r"refused: it holds Python objects beyond tensors") as err:
        load_checkpoint(evil)
    assert "\n" not in str(err.value) and not marker.exists()
    with pytest.raises(ValueError, match="refused"):  # resuming from it is refused the same way
        train_sae(iter([]), 8, SAETrainConfig(architecture="topk", d_sae=16, k=2, total_steps=4), progress=False,
                  checkpoint_dir=evil.parent, resume=True)  # fmt: skip
    assert not marker.exists()
    data = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"step": 3}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a t5hooks SAE training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_resume_checks_the_configuration(tmp_path):
    out = tmp_path / "run"
    small_run(out)
    with pytest.raises(ValueError, match=r"this run differs from .*lr: .* has 0.0003, this run 0.001.*--override lr"):
        small_run(out, lr=1e-3, total_steps=6)  # (total_steps too)
    with pytest.raises(ValueError, match=r"cannot continue with a different d_sae: 16 -> 32"):
        small_run(out, d_sae=32)
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    cfg = SAETrainConfig(
        architecture="topk", d_sae=16, k=2, total_steps=6, metrics_every=2, checkpoint_every=2, lr=1e-3
    )
    result = train_sae(iter(x.split(64)), 8, cfg, progress=False, checkpoint_dir=out, resume=True,
                       override=["lr", "total_steps"])  # fmt: skip
    assert [m["step"] for m in result.metrics] == [2, 4, 6]
    assert load_checkpoint(out / "checkpoint.pt")["config"]["lr"] == 1e-3
    with pytest.raises(ValueError, match=r"override \['lrr'\]: not configuration or data fields"):
        train_sae(iter([]), 8, cfg, progress=False, checkpoint_dir=out, resume=True, override=["lrr"])
