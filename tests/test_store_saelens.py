"""`extract(format="saelens")` writes what SAELens trains on: checked by loading it with sae_lens itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from t5hooks import HookedEncoderDecoder
from t5hooks.store import ActivationStore, extract

sae_lens = pytest.importorskip("sae_lens")
datasets = pytest.importorskip("datasets")

NAMES = ["encoder.0.hook_resid_post", "encoder.1.attn.hook_z"]


def test_saelens_activations_store_yields_our_numbers(tmp_path: Path) -> None:
    from sae_lens.training.activations_store import ActivationsStore

    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny")
    texts = [f"prompt number {i} " + "ab" * (i % 9) for i in range(40)]
    ctx = 16
    summary = extract(
        model, texts, NAMES, tmp_path / "sae", format="saelens", context_size=ctx, window=16, backend="eager",
        progress=False,
    )  # fmt: skip
    assert summary.saelens_dir == tmp_path / "sae"
    native = ActivationStore(tmp_path / "sae")
    ours = {name: native.load(name) for name in NAMES}  # one process: store order is doc order
    n_tokens = len(ours[NAMES[0]]["doc"])
    n_rows = n_tokens // ctx

    ds = datasets.load_from_disk(str(tmp_path / "sae"))
    assert len(ds) == n_rows
    assert ds.features["token_ids"] == datasets.Sequence(datasets.Value("int32"), length=ctx)
    assert ds.features[NAMES[1]] == datasets.Array2D(shape=(ctx, 128), dtype="float32")  # [H, d_head] flattened

    for name in NAMES:
        d_in = ours[name]["acts"][0].numel()
        store = ActivationsStore(
            model=None, dataset=None, streaming=False, hook_name=name, hook_head_index=None, context_size=ctx,
            d_in=d_in, n_batches_in_buffer=2, total_training_tokens=n_rows * ctx, store_batch_size_prompts=n_rows,
            train_batch_size_tokens=ctx, prepend_bos=False, normalize_activations="none", device=torch.device("cpu"),
            dtype="float32", cached_activations_path=str(tmp_path / "sae"),
        )  # fmt: skip
        acts, token_ids = store.get_raw_llm_batch()  # [rows * ctx, d_in], [rows * ctx]
        cut = n_rows * ctx
        assert torch.equal(acts, ours[name]["acts"][:cut].reshape(cut, d_in))
        assert torch.equal(token_ids.long(), ours[name]["token_id"][:cut].long())
    assert (token_ids != model.cfg.pad_token_id).all()  # packed from real tokens: no padding

    again = extract(model, texts, NAMES, tmp_path / "sae", format="saelens", context_size=ctx, window=16,
                    backend="eager", progress=False)  # fmt: skip
    assert again.shards_written == 0 and again.saelens_dir == tmp_path / "sae"
    with pytest.raises(ValueError, match="saelens_context_size"):
        extract(model, texts, NAMES, tmp_path / "sae", format="saelens", context_size=8, window=16, progress=False)
    with pytest.raises(ValueError, match="one token stream"):
        extract(model, texts, ["hook_embed", "hook_decoder_embed"], tmp_path / "x", format="saelens", context_size=8)
    with pytest.raises(ValueError, match="bfloat16"):
        extract(model, texts, "hook_embed", tmp_path / "x", format="saelens", context_size=8, dtype="bf16")
