"""Activation store: extract activations of real tokens from a corpus at scale, and read them back.

`extract(model, source, names, out_dir)` (settings: `ExtractConfig`) writes safetensors shards plus a JSON manifest (see format.py),
resumable and torchrun-aware; `format="saelens"` also writes SAELens's cached-activations dataset.
`ActivationStore(out_dir).batches(name, batch_size, seed)` yields shuffled `[batch, d]` training batches.
"""

from .config import ExtractConfig
from .extraction import ExtractSummary, extract
from .reader import ActivationStore

__all__ = ["ActivationStore", "ExtractConfig", "ExtractSummary", "extract"]
