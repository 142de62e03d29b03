"""Reliability of loading, second round: broken tokenizers are errors, absurd sizes are refused before anything
is allocated, and missing local paths are reported at once (never tried as hub ids)."""

from __future__ import annotations

import json
import os
import re
import struct
import time

import pytest
import torch
from t5_fixtures import hf_encoder, hf_t5

from t5hooks import HookedEncoderDecoder, HookedT5Encoder
from t5hooks.checkpoint_checks import CheckpointError


def tiny_tokenizer(folder):
    """A character-level fast tokenizer saved as `tokenizer.json` + `tokenizer_config.json`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate("abcdefghij")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "t5"
    hf_t5("t5_v1_0").save_pretrained(folder)
    return folder


# ---- tokenizers ---------------------------------------------------------------------------------------------


def test_a_tokenizer_beside_the_weights_is_loaded(checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "with_tokenizer"
    shutil.copytree(checkpoint, folder)
    tiny_tokenizer(folder)
    model = HookedEncoderDecoder.from_pretrained(str(folder))
    assert model.tokenizer is not None and model.to_tokens("abc")[0].tolist()[:3] == [3, 4, 5]


def test_no_tokenizer_files_means_no_tokenizer(checkpoint):
    assert HookedEncoderDecoder.from_pretrained(str(checkpoint)).tokenizer is None


@pytest.mark.parametrize(
    "file,content,reason",
    [
        ("tokenizer.json", "{ not json", "JSONDecodeError"),
        ("tokenizer.json", '{"model": {"type": "NoSuchModel"}}', "KeyError"),
        ("spiece.model", "not a sentencepiece model", ""),
    ],
)
def test_a_tokenizer_file_that_fails_to_load_is_an_error_with_the_reason(checkpoint, tmp_path, file, content, reason):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(checkpoint, folder)
    if file == "tokenizer.json":
        tiny_tokenizer(folder)
    (folder / file).write_text(content)
    pattern = rf"tokenizer files \(.*{re.escape(file)}.*\) could not be loaded: {reason}"
    with pytest.raises(CheckpointError, match=pattern) as err:
        HookedEncoderDecoder.from_pretrained(str(folder))
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


# ---- sizes ----------------------------------------------------------------------------------------------------


def with_config(checkpoint, tmp_path, **changes):
    import shutil

    folder = tmp_path / "sized"
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"num_layers": 10**6}, "num_layers"),
        ({"vocab_size": 10**30}, "vocab_size"),
        ({"d_ff": 10**12}, "d_ff"),
        ({"num_decoder_layers": 10**7}, "num_decoder_layers"),
        ({"num_heads": 10**5, "d_kv": 10**5}, "d_kv=100000, num_heads"),
        ({"vocab_size": 10**400}, "vocab_size"),
    ],
)
def test_absurd_config_sizes_are_refused_before_allocating(checkpoint, tmp_path, changes, field):
    folder = with_config(checkpoint, tmp_path, **changes)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf": ({field})=\d+ impl(y|ies) .* of float32 weights, more than") as err:
        HookedEncoderDecoder.from_pretrained(str(folder))
    assert time.perf_counter() - start < 10  # refused from the numbers, not after minutes of allocating
    assert "\n" not in str(err.value) and "nothing was allocated" in str(err.value)


def test_a_model_larger_than_this_machine_is_refused_naming_its_memory(checkpoint, tmp_path):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # vocab_size alone implying ~2x this machine's RAM (d_model 32, fp32, embedding only), under the 1 TiB ceiling
    vocab = min(2 * ram, (1 << 40) - (1 << 30)) // (32 * 4)
    folder = with_config(checkpoint, tmp_path, vocab_size=vocab)
    with pytest.raises(ValueError, match=r"vocab_size=\d+ implies .* GiB of float32 weights, more than this machine"):
        HookedEncoderDecoder.from_pretrained(str(folder))


def test_a_gguf_header_with_an_absurd_block_count_is_refused(tmp_path):
    gguf = pytest.importorskip("gguf")
    from test_weight_formats import write_gguf

    path = tmp_path / "blocks.gguf"
    write_gguf(path, hf_encoder("t5", d_ff=64), lambda name, array: gguf.GGMLQuantizationType.F32)
    data = bytearray(path.read_bytes())
    key = b"t5encoder.block_count"
    at = data.index(key) + len(key)
    assert struct.unpack_from("<I", data, at)[0] == gguf.GGUFValueType.UINT32
    struct.pack_into("<I", data, at + 4, 10**6)
    path.write_bytes(bytes(data))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"t5encoder\.block_count=1000000, but the file holds only \d+ tensors"):
        HookedT5Encoder.from_pretrained(str(path))
    assert time.perf_counter() - start < 10


def test_sizes_are_counted_exactly():
    """The weight count the check uses equals the parameters of the built model (every family member)."""
    from t5hooks.allocation import weight_count

    for variant in ("t5_v1_0", "t5_v1_1"):
        model = HookedEncoderDecoder.from_pretrained("m", hf_model=hf_t5(variant))
        assert weight_count(model.cfg) == sum(p.numel() for p in model.parameters()), variant
    encoder = HookedT5Encoder.from_pretrained("e", hf_model=hf_encoder("umt5"))
    assert weight_count(encoder.cfg, decoder=False) == sum(p.numel() for p in encoder.parameters())
    assert torch.get_default_dtype() == torch.float32


def test_a_config_built_in_code_is_checked_before_the_model_allocates():
    from t5hooks import HookedT5Config

    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"HookedT5Config: n_layers=1000000, n_decoder_layers=1000000 imply .* more"):
        HookedEncoderDecoder(HookedT5Config(d_model=64, d_head=16, n_heads=4, d_mlp=128, n_layers=10**6, d_vocab=100))
    with pytest.raises(ValueError, match=r"d_vocab=10{30} implies"):
        HookedT5Encoder(HookedT5Config(d_vocab=10**30))
    assert time.perf_counter() - start < 5
    with torch.device("meta"):  # nothing is allocated on the meta device: no limit
        HookedEncoderDecoder(HookedT5Config(d_model=64, d_head=16, n_heads=4, d_mlp=128, n_layers=2, d_vocab=10**10))
