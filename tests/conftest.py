"""Shared test set-up.

The Triton interpreter must be switched on before any `@triton.jit` function is defined, so it
is set here, before the tests import t5hooks. On a machine with CUDA the real kernels run.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Compiled captures keep their warm-start artefacts in the user's cache by default; tests use a directory of
# their own (one per session), so a test never depends on, or leaves behind, a developer's cache.
if "T5HOOKS_COMPILE_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["T5HOOKS_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="t5hooks-test-compile-cache-")
    atexit.register(shutil.rmtree, os.environ["T5HOOKS_COMPILE_CACHE"], ignore_errors=True)
# `make test` runs two pytest-xdist workers (one per core, whole files per worker): each compiles into its own
# inductor cache, so two compiles of the same graph never race on one cache folder (subprocesses inherit it).
if os.environ.get("PYTEST_XDIST_WORKER") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor-{os.getuid()}-{os.environ['PYTEST_XDIST_WORKER']}"
    )

# The test models are tiny: one thread is as fast, and immune to oversubscription when the machine is busy.
torch.set_num_threads(1)


# Parametrized cases of the interpreted-kernel tests that take over ~2 s on 2 cores: `make test-fast` keeps the
# cheaper cases of the same tests (every kernel path still runs), `make test` runs them all.
SLOW_CASES = {
    "tests/test_kernels.py::test_gradients_match_float64_reference[encoder-far-tiles]",
    "tests/test_kernels.py::test_gradients_match_float64_reference[encoder-t5-buckets-padded]",
    "tests/test_kernels.py::test_gradients_match_float64_reference[strided-scaled-d64]",
    "tests/test_kernels.py::test_gradients_match_float64_reference[random-1]",
    "tests/test_kernels.py::test_gradients_match_float64_reference[fp16-causal]",
    "tests/test_kernels.py::test_decode_path_matches_reference[3]",
    "tests/test_kernels.py::test_forward_matches_reference[encoder-far-tiles]",
    "tests/test_kernels.py::test_forward_matches_reference[random-0]",
    "tests/test_kernels.py::test_forward_matches_reference[decoder-causal]",
    "tests/test_kernels.py::test_forward_matches_reference[cross-attention]",
    "tests/test_kernels.py::test_forward_matches_reference[encoder-t5-buckets-padded]",
}


# Reference implementations that some tests check against (the `test` extra). Locally a missing one skips
# those tests; with T5HOOKS_REQUIRE_REFERENCES=1 (set by .ci/run) a missing one fails the run, so CI never
# passes with the reference checks silently skipped.
REFERENCE_PACKAGES = ("sae_lens", "pyvene", "datasets", "gguf", "diffusers", "transformer_lens")


def pytest_configure(config):
    import importlib.util

    import pytest

    if os.environ.get("T5HOOKS_REQUIRE_REFERENCES") == "1":
        missing = [name for name in REFERENCE_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise pytest.UsageError(
                f"reference packages missing: {', '.join(missing)} (install the test extra: pip install -e '.[dev,test]')"
            )


# The files that take longest in `make test` (measured: --durations), run first so that the two xdist workers
# finish together instead of one waiting out a long file at the end (longest-first scheduling; the Makefile
# passes --no-loadscope-reorder, else xdist reorders files by their number of tests).
LONGEST_FILES = (
    "test_readme.py",
    "test_regional_compile.py",
    "test_onnx_levers.py",
    "test_intervention_cli.py",
    "test_store.py",
    "test_capture.py",
    "test_compile_levers.py",
    "test_cli.py",
    "test_onnx.py",
    "test_intervene.py",
    "test_reliability.py",
    "test_tl_fidelity.py",
)


def pytest_collection_modifyitems(items):
    import pytest

    for item in items:
        if item.nodeid in SLOW_CASES:
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests stay in order
