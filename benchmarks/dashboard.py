"""`t5hooks bench dashboard` from a checkout: feature-dashboard cost against store size (4096 features over up to
1M tokens of a t5-small-shaped store; the benchmark lives in t5hooks/apps/bench/dashboard.py).

    python benchmarks/dashboard.py [--tokens 125000 250000 500000 1000000] [--d-sae 4096]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's t5hooks, not an installed one

from t5hooks.apps.bench.dashboard import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
