"""Regional compilation: one compiled region per stack, reused by every layer, forward and backward, with dynamic
batch and lengths (one graph for a realistic run of batch shapes) and the same numbers as eager."""

import pytest
import torch
import torch._dynamo
from t5_fixtures import random_batch
from torch._dynamo.testing import CompileCounterWithBackend

from t5hooks import HookedEncoderDecoder, HookedT5Config

RESID = ["encoder.*.hook_resid_post", "decoder.*.hook_resid_post"]


def tiny(**overrides):
    settings = dict(
        d_model=16,
        d_head=4,
        n_heads=2,
        d_mlp=24,
        n_layers=3,
        n_decoder_layers=3,
        d_vocab=40,
        gated_mlp=True,
        act_fn="gelu_new",
        tie_word_embeddings=False,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        seed=0,
    )
    return HookedEncoderDecoder(HookedT5Config(**{**settings, **overrides}))


def batch(model, b, e, d, seed):
    tokens, mask, dec, dec_mask = random_batch(model.cfg.d_vocab, b, e, d, seed=seed, pad_decoder=True)
    return tokens, dec, mask, dec_mask


def regions(graph: torch.fx.GraphModule) -> tuple[int, int]:
    """(distinct region bodies called, region calls) in a Dynamo graph."""
    calls = [n for n in graph.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
    return len({n.args[1] for n in calls}), len(calls)


# A training run's batch shapes: full batches of varying lengths, a short last batch (sizes >= 2: PyTorch
# specialises sizes 0 and 1 whatever is marked dynamic, so a batch of one compiles a second graph).
SHAPES = [(4, 12, 6), (4, 9, 5), (4, 16, 7), (3, 12, 6), (4, 6, 9), (2, 11, 4)]


@pytest.mark.slow
def test_regional_training_step_matches_eager_with_one_graph_and_one_region_per_stack():
    torch._dynamo.reset()
    eager_model, compiled_model = tiny(), tiny()
    eager_cap = eager_model.capture(RESID, patch=["decoder.1.hook_mlp_out"], patch_mode="add")
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(
        compiled_model.capture(eager_cap.names, patch=eager_cap.patch_names, patch_mode="add"),
        fullgraph=True,
        backend=backend,
    )
    steer = torch.randn(16)

    def step(cap, tokens, dec, mask, dec_mask):
        out = cap(tokens, dec, mask, dec_mask, patches={"decoder.1.hook_mlp_out": steer}, labels=dec)
        loss = out["loss"] + 1e-2 * sum(out[n].abs().mean() for n in out if n.endswith("hook_resid_post"))
        loss.backward()
        return out, loss

    for seed, shape in enumerate(SHAPES):
        args = batch(eager_model, *shape, seed)
        eager_model.zero_grad(), compiled_model.zero_grad()
        ref_out, ref_loss = step(eager_cap, *args)
        out, loss = step(compiled, *args)
        assert list(out) == list(ref_out)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
        for name in ref_out:
            torch.testing.assert_close(out[name], ref_out[name], atol=1e-5, rtol=0)
        for (name, p), q in zip(eager_model.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=0, msg=name)
    assert backend.frame_count == 1  # one dynamic graph for every shape: no recompiles
    # one region body per stack, called by every layer whose capture and patch sets look alike: the 3 encoder
    # layers and decoder layers 0 and 2; the patched decoder layer 1 differs and is compiled on its own
    assert regions(backend.graphs[0]) == (2, 5)


def test_regions_inline_interventions_and_keep_side_outputs():
    """A layer with an intervention runs inline (its module and side outputs in the outer graph); the others
    stay regions; outputs equal eager, names and order included."""
    from t5hooks.interventions import SAE

    torch._dynamo.reset()
    model = tiny()
    sae = SAE(16, 32, seed=0)
    cap = model.capture(RESID, intervene={"encoder.1.hook_resid_post": sae})
    backend = CompileCounterWithBackend("eager")
    compiled = torch.compile(cap, fullgraph=True, backend=backend)
    args = batch(model, 3, 9, 5, 0)
    with torch.no_grad():
        out, ref = compiled(*args), cap(*args)
    assert list(out) == list(ref) and any(name.startswith("encoder.1.hook_resid_post.") for name in out)
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], atol=1e-5, rtol=0)
    assert regions(backend.graphs[0]) == (2, 5)  # encoder layers 0, 2 and decoder layers 0-2; layer 1 inline


def test_whole_graph_compile_when_regions_are_off():
    torch._dynamo.reset()
    model = tiny()
    cap = model.capture(RESID)
    cap.regional = False
    backend = CompileCounterWithBackend("eager")
    with torch.no_grad():
        torch.compile(cap, fullgraph=True, backend=backend)(*batch(model, 2, 7, 5, 0))
    assert regions(backend.graphs[0]) == (0, 0)


WARM_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_regional_compile import RESID, batch, tiny
from t5hooks.capture import compile_capture

model = tiny(n_layers=1, n_decoder_layers=1)
fn = compile_capture(model.capture(RESID))
tokens, dec, mask, dec_mask = batch(model, 3, 9, 5, 0)
out = fn(tokens, dec, mask, dec_mask, labels=dec)
out["loss"].backward()
print(json.dumps({{"seconds": fn.compile_seconds["training"], "warm": fn.warm["training"],
                  "loss": out["loss"].item(), "grad": model.embed.W_E.grad.norm().item()}}))
"""


@pytest.mark.slow
def test_a_second_process_loads_the_compiled_training_step_from_the_cache(tmp_path):
    """Two fresh processes, each with an empty inductor cache of its own: the second finds the first one's
    artefacts in the t5hooks compile cache and compiles much faster, to the same numbers."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = WARM_SCRIPT.format(tests=str(Path(__file__).parent))
    runs = []
    for i in range(2):
        env = {
            **os.environ,
            "T5HOOKS_COMPILE_CACHE": str(tmp_path / "cc"),
            "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor{i}"),
        }
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append((json.loads(done.stdout.strip().splitlines()[-1]), done.stderr))
    (cold, cold_err), (warm, warm_err) = runs
    assert not cold["warm"] and warm["warm"]
    assert "t5hooks: compiling the CaptureModule for training" in cold_err and "from the compile cache" in warm_err
    assert warm["seconds"] < 0.5 * cold["seconds"], (cold["seconds"], warm["seconds"])
    assert warm["loss"] == cold["loss"] and warm["grad"] == cold["grad"]
