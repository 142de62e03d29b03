"""`t5hooks bench model --device cpu` from a checkout: t5hooks against HF eager T5 at t5-small shape (fp32, batch 8,
encoder 128, decoder 32); the rows live in t5hooks/apps/bench/model.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's t5hooks, not an installed one

from t5hooks.apps.bench.model import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["--device", "cpu", *sys.argv[1:]]))
