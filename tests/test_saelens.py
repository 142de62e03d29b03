"""SAELens's on-disk format both ways, checked against `sae_lens` itself (the `test` extra installs it):
its SAE on the same weights gives the same features and reconstructions, with and without the error term."""

import pytest
import torch

from t5hooks.interventions import SAE, BatchTopKSAE, JumpReLUSAE, TopKSAE
from t5hooks.interventions.saelens_format import load_saelens, save_saelens

sae_lens = pytest.importorskip("sae_lens")

D_IN, D_SAE = 12, 40


def randomised(sae):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.3)
    return sae


def reference_sae(architecture, **extra):
    cfg = {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", **extra}
    sae = sae_lens.SAE.from_dict(cfg)
    randomised(sae)
    return sae


def x_batch():
    return torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(7))


def assert_same_function(ours, theirs, x):
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-6, rtol=1e-5)
        features = theirs.encode(x)
        assert (features > 0).any() and (features == 0).any()
        torch.testing.assert_close(ours.decode(features), theirs.decode(features), atol=1e-6, rtol=1e-5)
        out, side = ours(x)
        torch.testing.assert_close(out, theirs(x), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(side["features"], features, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "architecture,extra,cls",
    [("standard", {}, SAE), ("topk", {"k": 6}, TopKSAE), ("jumprelu", {}, JumpReLUSAE),
     ("topk", {"k": 6, "rescale_acts_by_decoder_norm": True}, TopKSAE)],
    ids=["standard", "topk", "jumprelu", "topk-rescaled"],
)  # fmt: skip
def test_load_saelens_folder(tmp_path, architecture, extra, cls):
    theirs = reference_sae(architecture, **extra)
    theirs.save_model(tmp_path)
    ours = load_saelens(tmp_path)
    assert type(ours) is cls
    assert_same_function(ours, theirs, x_batch())
    ours_err = load_saelens(tmp_path, use_error_term=True)  # splice with the error: output == input
    theirs_err = sae_lens.SAE.load_from_disk(tmp_path)
    theirs_err._use_error_term = True  # (the setter only warns that HookedSAETransformer is preferred)
    assert_same_function(ours_err, theirs_err, x_batch())
    torch.testing.assert_close(ours_err(x_batch())[0], x_batch(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "ours",
    [SAE(D_IN, D_SAE, apply_b_dec_to_input=False), TopKSAE(D_IN, D_SAE, k=5), JumpReLUSAE(D_IN, D_SAE)],
    ids=["standard", "topk", "jumprelu"],
)
def test_save_for_saelens(tmp_path, ours):
    randomised(ours)
    save_saelens(ours, tmp_path, hook_name="decoder.1.hook_resid_post")
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert theirs.cfg.metadata.hook_name == "decoder.1.hook_resid_post"
    assert theirs.cfg.apply_b_dec_to_input == ours.apply_b_dec_to_input
    assert_same_function(ours, theirs, x_batch())
    again = load_saelens(tmp_path)  # and back: the same tensors
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value, atol=0, rtol=0)


def test_batchtopk_saves_as_jumprelu_with_its_threshold(tmp_path):
    ours = randomised(BatchTopKSAE(D_IN, D_SAE, k=4))
    x = x_batch().reshape(-1, D_IN)
    ours.train()
    features = ours.encode(x)
    assert int((features > 0).sum()) <= 4 * x.shape[0]  # k per token on average, over the whole batch
    ours.eval()
    save_saelens(ours, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert theirs.cfg.architecture() == "jumprelu"
    assert_same_function(ours, theirs, x_batch())


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_saelens(tmp_path)
    theirs = reference_sae("standard", normalize_activations="expected_average_only_in")
    theirs.save_model(tmp_path)
    with pytest.raises(ValueError, match="normalize_activations='expected_average_only_in' is not supported"):
        load_saelens(tmp_path)
