#!/usr/bin/env bash
# The one prepared script for a session lent a GPU (H100/H200): correctness on the GPU, then the benchmarks.
# Runs from the checkout with PYTHONPATH=. (the device image has torch, triton, transformers, onnx, onnxruntime).
# Writes attention.json / attention.png / *.txt (bench_cpu.txt: the CPU levers) to ${OUT:-out}; copy the tables into
# benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
timeout 240 python -m pytest -q -x tests/test_kernels_gpu.py tests/test_fused_model.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 240 python -m t5hooks.apps.cli bench attention --out "$OUT" 2>&1 | tail -40 | tee "$OUT/bench_attention.txt"
timeout 120 python -m t5hooks.apps.cli bench model --no-compile 2>&1 | tail -20 | tee "$OUT/bench_model.txt"
# The CPU side of the same machine (its host CPU, 16 cores): every CPU lever against HF eager, with GEMM GFLOP/s.
timeout 420 python benchmarks/cpu.py --skip max-autotune generate 2>&1 | grep -v -i warn | tail -45 | tee "$OUT/bench_cpu.txt"
