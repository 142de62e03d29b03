"""Regional compilation: one compiled region per stack, reused by every layer, forward and backward, with dynamic
batch and lengths (one graph for a realistic run of batch shapes) and the same numbers as eager."""

import re

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
    """(distinct region bodies called, region calls) in a Dynamo graph, read from its code:
    `invoke_subgraph(subgraph_3, 'subgraph_1', ...)` calls body 'subgraph_1'."""
    bodies = re.findall(r"torch\.ops\.higher_order\.invoke_subgraph\(\w+, '(\w+)'", graph.code)
    return len(set(bodies)), len(bodies)


# A training run's batch shapes: batches of varying lengths, a short last batch (sizes >= 2: PyTorch
# specialises sizes 0 and 1 whatever is marked dynamic, so a batch of one compiles a second graph).
SHAPES = [(4, 12, 6), (4, 9, 5), (3, 16, 7), (2, 11, 4)]


@pytest.fixture(scope="module")
def training_run():
    """One compiled capture of a 2+2-layer model (every layer's resid_post captured) trained for a step per batch
    shape beside an eager twin. Compiled once with `aot_eager` (Dynamo + AOTAutograd: the regions and the
    backward as inductor gets them, without its C++ build); the tests below read the one run."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_model, compiled_model = tiny(n_layers=2, n_decoder_layers=2), tiny(n_layers=2, n_decoder_layers=2)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model.capture(RESID), fullgraph=True, backend=backend)

    def step(cap, model, tokens, dec, mask, dec_mask):
        model.zero_grad()
        out = cap(tokens, dec, mask, dec_mask, labels=dec)
        loss = out["loss"] + 1e-2 * sum(out[n].abs().mean() for n in out if n.endswith("hook_resid_post"))
        loss.backward()
        return (
            {name: value.detach() for name, value in out.items()},
            loss.detach(),
            [p.grad for p in model.parameters()],
        )

    steps = []
    for seed, shape in enumerate(SHAPES):
        args = batch(eager_model, *shape, seed)
        steps.append((step(eager_model.capture(RESID), eager_model, *args), step(compiled, compiled_model, *args)))
    return {"steps": steps, "backend": backend, "graph_breaks": sum(counters["graph_break"].values())}


@pytest.mark.slow
def test_regional_training_steps_equal_eager_forward_and_backward(training_run):
    for (ref_out, ref_loss, ref_grads), (out, loss, grads) in training_run["steps"]:
        assert list(out) == list(ref_out)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
        for name in ref_out:
            torch.testing.assert_close(out[name], ref_out[name], atol=1e-5, rtol=0, msg=name)
        assert len(grads) == len(ref_grads) and all(g is not None for g in grads)
        for got, want in zip(grads, ref_grads):  # every weight of the model
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_one_graph_for_a_run_of_batch_shapes_and_no_graph_breaks(training_run):
    assert training_run["backend"].frame_count == 1  # one dynamic graph for all 4 batch shapes: no recompiles
    assert training_run["graph_breaks"] == 0


@pytest.mark.slow
def test_one_region_per_stack_reused_by_every_layer(training_run):
    assert regions(training_run["backend"].graphs[0]) == (2, 4)  # 2 bodies (encoder, decoder), 4 layers call them


@pytest.mark.slow
def test_a_layer_with_an_intervention_runs_inline_the_others_stay_regions():
    """Encoder layer 1 (an SAE spliced in) runs inline, its module and side outputs in the outer graph; encoder
    layers 0 and 2 and the three decoder layers stay regions. Outputs, names and order equal eager."""
    from t5hooks.interventions import SAE

    torch._dynamo.reset()
    model = tiny()
    cap = model.capture(RESID, intervene={"encoder.1.hook_resid_post": SAE(16, 32, seed=0)})
    backend = CompileCounterWithBackend("eager")
    args = batch(model, 3, 9, 5, 0)
    with torch.no_grad():
        out, ref = torch.compile(cap, fullgraph=True, backend=backend)(*args), cap(*args)
    assert list(out) == list(ref) and any(name.startswith("encoder.1.hook_resid_post.") for name in out)
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], atol=1e-5, rtol=0)
    assert regions(backend.graphs[0]) == (2, 5)  # encoder 0 and 2 share a body; decoder 0-2 share another


@pytest.mark.slow
def test_whole_graph_compile_when_regions_are_off():
    torch._dynamo.reset()
    model = tiny(n_layers=1, n_decoder_layers=1)
    cap = model.capture(RESID)
    cap.regional = False
    backend = CompileCounterWithBackend("eager")
    args = batch(model, 2, 7, 5, 0)
    with torch.no_grad():
        out, ref = torch.compile(cap, fullgraph=True, backend=backend)(*args), cap(*args)
    assert regions(backend.graphs[0]) == (0, 0)
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_dynamic_true_runs_the_blocks_inline():
    """`torch.compile(..., dynamic=True)` makes LayerNorm's eps a symbolic float, which inductor refuses as a region
    operand (torch 2.13): the blocks then run inline (whole graph), to the same numbers as eager."""
    torch._dynamo.reset()
    model = tiny(n_layers=2, n_decoder_layers=2)
    cap = model.capture(RESID)
    backend = CompileCounterWithBackend("eager")
    args = batch(model, 2, 7, 5, 0)
    with torch.no_grad():
        out, ref = torch.compile(cap, fullgraph=True, dynamic=True, backend=backend)(*args), cap(*args)
    assert regions(backend.graphs[0]) == (0, 0)
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], atol=1e-5, rtol=0)


WARM_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_regional_compile import RESID, batch, tiny
from t5hooks.capture import compile_capture
from t5hooks.compile_cache import cache_root
from torch._dynamo.utils import counters

model = tiny(n_layers=1, n_decoder_layers=1)
cap = model.capture(RESID)
fn = compile_capture(cap)
tokens, dec, mask, dec_mask = batch(model, 3, 9, 5, 0)
with torch.no_grad():
    eager, compiled = cap(tokens, dec, mask, dec_mask), fn(tokens, dec, mask, dec_mask)
print(json.dumps({{
    "root": str(cache_root()),
    "eager": {{name: value.tolist() for name, value in eager.items()}},
    "compiled": {{name: value.tolist() for name, value in compiled.items()}},
    "seconds": fn.compile_seconds["inference"],
    "warm": fn.warm["inference"],
    "fx_graph_cache": {{k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}},
}}))
"""


@pytest.mark.slow
def test_a_second_process_loads_the_compiled_capture_from_the_cache(tmp_path):
    """Two fresh processes, each with an empty inductor cache of its own (as on a new machine or after /tmp was
    cleaned) and the compile cache in its documented default place (`$XDG_CACHE_HOME/t5hooks/compile`): the
    first announces a cold compile with its expected duration; the second finds the first one's artefacts, says
    so with the time the first one measured, and takes every compiled graph from them (inductor's FX-graph cache:
    hits only, no lowering) to the same numbers, equal to eager. The capture's inference forward of a 1+1-layer
    model keeps this test short; `t5hooks bench compiling` measures the training step the same way."""
    import json
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from t5hooks import compile_cache

    script = WARM_SCRIPT.format(tests=str(Path(__file__).parent))
    base = {k: v for k, v in os.environ.items() if k != compile_cache.ENV}
    runs = []
    for i in range(2):
        env = {**base, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"ind{i}")}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append((json.loads(done.stdout.strip().splitlines()[-1]), done.stderr))
    (cold, cold_err), (warm, warm_err) = runs
    root = tmp_path / "xdg" / "t5hooks" / "compile"
    assert cold["root"] == str(root) and len(list(root.glob("*/*.bin"))) == 1  # one entry, in the documented place
    assert not cold["warm"] and warm["warm"]
    said = r"t5hooks: compiling the CaptureModule for inference \(one region per stack, cpu\): about \d+ s \("
    assert re.search(said + "first compile of this work here", cold_err), cold_err[-2000:]
    assert re.search(said + "from the compile cache; compile time: measured here", warm_err), warm_err[-2000:]
    assert cold["fx_graph_cache"].get("fxgraph_cache_miss", 0) >= 1  # compiled here
    assert warm["fx_graph_cache"].get("fxgraph_cache_hit", 0) >= 1, warm["fx_graph_cache"]  # loaded, not compiled
    assert warm["fx_graph_cache"].get("fxgraph_cache_miss", 0) == 0, warm["fx_graph_cache"]
    assert warm["seconds"] < cold["seconds"], (cold["seconds"], warm["seconds"])
    assert warm["compiled"] == cold["compiled"]  # bit-identical: the same compiled code
    for run in (cold, warm):
        assert list(run["compiled"]) == list(run["eager"])
        for name, value in run["eager"].items():
            torch.testing.assert_close(torch.tensor(run["compiled"][name]), torch.tensor(value), atol=1e-5, rtol=0)
    assert compile_cache.clear(root) == 2 and not root.exists()  # the artefacts and their measured-times record
