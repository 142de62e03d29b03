"""from_pretrained through all three routes: a live HF model, a save_pretrained directory, a hub name (offline cache)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from t5_fixtures import hf_t5, random_batch

from t5hooks import HookedEncoderDecoder


def logits_of(model, hf):
    tokens, mask, dec, _ = random_batch(model.cfg.d_vocab, 2, 9, 4)
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=mask, decoder_input_ids=dec).logits
        ours = model(tokens, dec, one_zero_attention_mask=mask)
    return ours, ref


@pytest.mark.parametrize("variant", ["t5_v1_0", "t5_v1_1"])
def test_live_model_shares_storage(variant):
    hf = hf_t5(variant)
    model = HookedEncoderDecoder.from_pretrained("live", hf_model=hf)
    ours, ref = logits_of(model, hf)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    # no second copy of the weights: the parameters are the HF tensors
    assert model.encoder[0].attn.q_proj.data_ptr() == hf.encoder.block[0].layer[0].SelfAttention.q.weight.data_ptr()


@pytest.mark.parametrize("variant", ["t5_v1_0", "t5_v1_1"])
def test_local_directory_safetensors(tmp_path, variant):
    hf = hf_t5(variant)
    hf.save_pretrained(tmp_path)
    model = HookedEncoderDecoder.from_pretrained(str(tmp_path))
    assert model.cfg.tie_word_embeddings == (variant == "t5_v1_0")
    ours, ref = logits_of(model, hf)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_local_directory_bin_and_sharded(tmp_path):
    """`.bin` checkpoints load with weights_only=True; sharded safetensors follow their index."""
    hf = hf_t5("t5_v1_1")
    hf.save_pretrained(tmp_path / "st")
    state = load_file(tmp_path / "st" / "model.safetensors")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(tmp_path / "st" / "config.json", bin_dir / "config.json")
    torch.save(state, bin_dir / "pytorch_model.bin")
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    shutil.copy(tmp_path / "st" / "config.json", shard_dir / "config.json")
    keys = sorted(state)
    halves = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for file, names in halves.items():
        save_file({k: state[k].contiguous() for k in names}, shard_dir / file)
        weight_map.update({k: file for k in names})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for directory in (bin_dir, shard_dir):
        model = HookedEncoderDecoder.from_pretrained(str(directory))
        ours, ref = logits_of(model, hf)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_hub_name_through_transformers_cache(tmp_path):
    """A hub name resolves through transformers' cache (here an offline cache laid out as the hub client does)."""
    hf = hf_t5("t5_v1_0")
    commit = "0" * 40
    repo = tmp_path / "models--t5hooks-test--tiny-t5"
    snapshot = repo / "snapshots" / commit
    hf.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    model = HookedEncoderDecoder.from_pretrained("t5hooks-test/tiny-t5", cache_dir=str(tmp_path), local_files_only=True)
    ours, ref = logits_of(model, hf)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_dtype_and_config_overrides(tmp_path):
    hf = hf_t5("t5_v1_1")
    hf.save_pretrained(tmp_path)
    model = HookedEncoderDecoder.from_pretrained(str(tmp_path), dtype=torch.bfloat16, use_attn_result=True)
    assert model.W_E.dtype == torch.bfloat16 and model.cfg.dtype == torch.bfloat16
    assert "encoder.0.attn.hook_result" in model.hook_dict


def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        HookedEncoderDecoder.from_pretrained(str(tmp_path))
    hf = hf_t5("t5_v1_0")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "bart"}))
    with pytest.raises(ValueError, match="supported: t5, mt5"):
        HookedEncoderDecoder.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_layers": 5}))
    with pytest.raises(ValueError, match="missing"):
        HookedEncoderDecoder.from_pretrained(str(tmp_path))


def test_checkpoint_code_is_never_executed(tmp_path):
    """A pickle that would run code on load is refused (weights_only=True)."""

    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (exec, (f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')",))

    hf = hf_t5("t5_v1_0")
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"shared.weight": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        HookedEncoderDecoder.from_pretrained(str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("variant,tie", [("t5_v1_1", False), ("t5_v1_0", True)])
def test_transformers_4x_config(tmp_path, variant, tie):
    """4.x configs carry no `scale_decoder_outputs`: `tie_word_embeddings` decides the logit scaling."""
    hf = hf_t5(variant)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("scale_decoder_outputs")
    config["tie_word_embeddings"] = tie
    config["transformers_version"] = "4.46.0"
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = HookedEncoderDecoder.from_pretrained(str(tmp_path))
    assert model.cfg.scale_logits == tie and model.cfg.tie_word_embeddings == tie
    ours, ref = logits_of(model, hf)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
