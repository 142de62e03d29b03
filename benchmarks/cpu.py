"""`t5hooks bench cpu` from a checkout: every CPU fast path against HF eager T5, with the machine, versions and
the GEMM GFLOP/s (the rows live in t5hooks/apps/bench/cpu.py).

    python benchmarks/cpu.py [--quick] [--skip WORD ...] [--threads N] [--repeats N]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's t5hooks, not an installed one

from t5hooks.apps.bench.cpu import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
