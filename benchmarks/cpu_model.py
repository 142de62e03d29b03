"""CPU benchmark at t5-small shape (fp32, batch 8, encoder 128, decoder 32): t5hooks against HF eager T5.

Same as `t5hooks bench model --device cpu`; see t5hooks/bench_model.py for the rows.
"""

import sys

from t5hooks.apps.bench_model import main

if __name__ == "__main__":
    raise SystemExit(main(["--device", "cpu", *sys.argv[1:]]))
