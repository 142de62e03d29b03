"""SAELens's on-disk SAE format: a folder with `cfg.json` and `sae_weights.safetensors`.

Weights: `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`, and `threshold [d_sae]`
for JumpReLU (BatchTopK SAEs are saved as JumpReLU, as SAELens does). `cfg.json` carries `architecture`,
`d_in`, `d_sae`, `apply_b_dec_to_input`, `normalize_activations`, `k` (topk) and `metadata.hook_name`; the older
layout (`activation_fn_str`, `activation_fn_kwargs.k`, top-level `hook_name`) loads too.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path
from .sae import SAE, BatchTopKSAE, JumpReLUSAE, build_sae

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout written here (SAELens >= 6.0)


def save_saelens(sae: SAE, directory: str | Path, *, hook_name: str | None = None, **metadata: Any) -> Path:
    """Write `sae` as SAELens would (each file atomically); returns the folder."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{str(directory)!r} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    if sae.rescale_acts_by_decoder_norm:  # SAELens stores the folded form (unit-norm decoder rows)
        sae = copy.deepcopy(sae)
        sae.fold_decoder_norm()
    architecture = "jumprelu" if isinstance(sae, BatchTopKSAE) else sae.architecture
    tensors = {name: getattr(sae, name).detach().contiguous().cpu() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if isinstance(sae, JumpReLUSAE):
        tensors["threshold"] = sae.threshold.detach().expand(sae.d_sae).contiguous().cpu()
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        # SAELens reads a cfg without a 6.x version marker as its pre-6.0 layout: this is the 6.x layout
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "hook_name": hook_name, **metadata},
    }
    if architecture == "topk":
        cfg["k"] = sae.k
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
        load_file(str(tmp))  # verify
    with atomic_path(directory / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2))
    return directory


def load_saelens(directory: str | Path, *, device: str | torch.device | None = None, **kwargs: Any) -> SAE:
    """Read a SAELens SAE folder into the matching t5hooks SAE (`kwargs`, e.g. `use_error_term`, go to it)."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a SAELens SAE folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg = json.loads(cfg_path.read_text())
    architecture, k = _architecture(cfg)
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm != "none":
        raise ValueError(
            f"{cfg_path}: normalize_activations={norm!r} is not supported (only 'none'); the SAE expects "
            "activations rescaled by statistics this folder does not hold"
        )
    if (cfg.get("reshape_activations") or "none") != "none":
        raise ValueError(
            f"{cfg_path}: reshape_activations={cfg['reshape_activations']!r} is not supported (only 'none')"
        )
    weights = load_file(str(weights_path))
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in weights]
    if architecture == "jumprelu" and "threshold" not in weights and "log_threshold" not in weights:
        missing.append("threshold")
    if missing:
        raise ValueError(f"{weights_path} lacks {missing} (has {sorted(weights)})")
    d_in, d_sae = weights["W_enc"].shape
    dtype = weights["W_enc"].dtype
    sae = build_sae(
        architecture,
        d_in,
        d_sae,
        k=k,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
        dtype=dtype,
        **kwargs,
    )
    if "threshold" not in weights and "log_threshold" in weights:
        weights["threshold"] = weights.pop("log_threshold").exp()
    state = {n: weights[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold") if n in weights}
    sae.load_state_dict(state, strict=True)
    sae.hook_name = (cfg.get("metadata") or {}).get("hook_name", cfg.get("hook_name"))
    return sae.to(device) if device is not None else sae


def _architecture(cfg: dict[str, Any]) -> tuple[str, int | None]:
    """SAELens architecture name and k, from the current or the older cfg layout."""
    arch = cfg.get("architecture")
    k = cfg.get("k")
    if arch is None:  # older layout
        act = cfg.get("activation_fn_str", "relu")
        arch = {"relu": "standard", "topk": "topk"}.get(act)
        if arch is None:
            raise ValueError(f"unsupported activation_fn_str={act!r}; supported: relu, topk")
        k = (cfg.get("activation_fn_kwargs") or {}).get("k", k)
    if arch == "batchtopk":  # saved as JumpReLU by SAELens; a batchtopk cfg with a threshold loads the same way
        arch = "jumprelu"
    if arch not in ("standard", "topk", "jumprelu"):
        raise ValueError(f"unsupported SAE architecture {arch!r}; supported: standard, topk, jumprelu")
    if arch == "topk" and k is None:
        raise ValueError("a topk SAE config needs k")
    return arch, k
