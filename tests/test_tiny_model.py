"""The embedded t5hooks-tiny model: loads offline from package data and reverses held-out strings."""

import pytest
import torch

from t5hooks import HookedEncoderDecoder
from t5hooks.apps.commands.train_tiny import train_tiny
from t5hooks.apps.reversal_task import exact_match_accuracy, held_out_words, make_batch, mirror_attention
from t5hooks.pretrained import ASSETS, tiny_config


def test_embedded_model_loads_offline_and_is_accurate_on_held_out_strings():
    path = ASSETS / "t5hooks-tiny.safetensors"
    assert path.stat().st_size <= 5 * 1024 * 1024
    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny")
    assert model.info["held_out_accuracy"] >= 0.99
    words = held_out_words()[:500]  # the fixed held-out set the reported accuracy was measured on
    assert exact_match_accuracy(model, words) >= 0.99


def test_cross_attention_learned_the_mirror_alignment():
    model = HookedEncoderDecoder.from_pretrained("t5hooks-tiny")
    words = held_out_words()[:64]
    batch = make_batch(words, model.tokenizer)
    names = [f"decoder.{l}.cross_attn.hook_pattern" for l in range(model.cfg.n_decoder_layers)]
    out = model.capture(names)(batch.tokens, one_zero_attention_mask=batch.mask, labels=batch.labels)
    assert mirror_attention([out[n] for n in names], batch) > 0.8


@pytest.mark.slow
def test_training_loop_runs_and_its_weights_round_trip(tmp_path):
    """A short eager run of the real training loop; the saved weights load back identically."""
    model, accuracy = train_tiny(out=tmp_path / "t.safetensors", steps=30, batch_size=32, compile=False, progress=False)
    from t5hooks.pretrained import load_tiny

    again = load_tiny(HookedEncoderDecoder, tmp_path / "t.safetensors")
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name
    assert again.info["steps"] == 30 and again.info["held_out_accuracy"] == accuracy
    # 30 steps of training lowered the loss from the same seeded initialisation
    batch = make_batch(held_out_words()[:64], again.tokenizer)
    untrained = HookedEncoderDecoder(tiny_config(seed=0))

    def loss(m):
        return m(batch.tokens, one_zero_attention_mask=batch.mask, labels=batch.labels, return_type="loss").item()

    with torch.no_grad():
        assert loss(again) < 0.9 * loss(untrained)


def test_one_tiny_architecture():
    """The shipped weights, the random built-in and the training script share one config (pretrained.tiny_config)."""

    def architecture(cfg):
        return {k: v for k, v in cfg.to_dict().items() if k != "device"}

    trained = architecture(HookedEncoderDecoder.from_pretrained("t5hooks-tiny").cfg)
    random_ = architecture(HookedEncoderDecoder.from_pretrained("t5hooks-tiny-random").cfg)
    assert trained == architecture(tiny_config())
    assert random_ == trained | {"model_name": "t5hooks-tiny-random"}
