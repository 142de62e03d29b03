"""Shared test set-up.

The Triton interpreter must be switched on before any `@triton.jit` function is defined, so it
is set here, before the tests import t5hooks. On a machine with CUDA the real kernels run.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test models are tiny: one thread is as fast, and immune to oversubscription when the machine is busy.
torch.set_num_threads(1)
