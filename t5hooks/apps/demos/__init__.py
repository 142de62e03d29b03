"""The guided demos: `t5hooks demo` (tour.py) and `t5hooks sae-demo` (sae.py)."""
