"""TransformerLens's Slice semantics, as ActivationCache applies them to the batch (and position) dimension."""

import pytest
import torch

from t5hooks.analysis.cache import apply_slice


@pytest.fixture(scope="module")
def cached():
    from t5hooks import HookedEncoderDecoder, HookedT5Config

    cfg = HookedT5Config(d_model=8, d_head=4, n_heads=2, d_mlp=8, n_layers=1, d_vocab=16, seed=0)
    model = HookedEncoderDecoder(cfg)
    tokens = torch.randint(0, 16, (4, 5), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens, tokens[:, :3], names_filter="*hook_resid_post")
    return cache["encoder.0.hook_resid_post"]  # [batch 4, pos 5, d_model 8]


def test_none_keeps_everything(cached):
    assert apply_slice(cached, None, dim=0) is cached


def test_int_selects_one_row_and_drops_the_dimension(cached):
    assert torch.equal(apply_slice(cached, 2, dim=0), cached[2])
    assert torch.equal(apply_slice(cached, -1, dim=0), cached[3])
    assert apply_slice(cached, 1, dim=0).shape == (5, 8)


def test_tuples_and_slices_keep_the_dimension(cached):
    assert torch.equal(apply_slice(cached, (1, 3), dim=0), cached[1:3])
    assert torch.equal(apply_slice(cached, (0, 4, 2), dim=0), cached[0:4:2])
    assert torch.equal(apply_slice(cached, slice(-2, None), dim=0), cached[-2:])
    assert torch.equal(apply_slice(cached, (1, 4), dim=-2), cached[:, 1:4])  # position axis, from the end


def test_index_lists_and_tensors_gather_rows(cached):
    assert torch.equal(apply_slice(cached, [3, 0], dim=0), cached[[3, 0]])
    assert torch.equal(apply_slice(cached, torch.tensor([0, -1]), dim=0), cached[[0, 3]])
    assert apply_slice(cached, [], dim=0).shape == (0, 5, 8)


def test_bad_selections_are_errors(cached):
    with pytest.raises(IndexError, match="out of range"):
        apply_slice(cached, [0, 4], dim=0)
    with pytest.raises(ValueError, match="1-D"):
        apply_slice(cached, [[0, 1]], dim=0)
    with pytest.raises(IndexError):
        apply_slice(cached, 4, dim=0)
