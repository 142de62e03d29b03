"""TransformerLens-shaped weight views: shapes, that they compute the hooked activations, QK/OV circuits."""

import torch
from t5_fixtures import hf_t5, hooked_from, random_batch


def test_weight_views_have_transformer_lens_shapes_and_share_storage():
    model = hooked_from(hf_t5("t5_v1_1"))  # 3 encoder + 2 decoder layers, gated
    cfg = model.cfg
    L, H, dm, dh, dmlp = 5, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_mlp
    assert model.W_Q.shape == model.W_K.shape == model.W_V.shape == (L, H, dm, dh)
    assert model.W_O.shape == (L, H, dh, dm)
    assert model.b_Q.shape == (L, H, dh) and model.b_O.shape == (L, dm) and not model.b_Q.any()
    assert model.W_Q_cross.shape == (2, H, dm, dh) and model.W_O_cross.shape == (2, H, dh, dm)
    assert model.W_in.shape == model.W_gate.shape == (L, dm, dmlp) and model.W_out.shape == (L, dmlp, dm)
    assert model.b_in.shape == (L, dmlp) and model.b_out.shape == (L, dm)
    assert (
        model.W_E.shape == (cfg.d_vocab, dm)
        and model.W_U.shape == (dm, cfg.d_vocab)
        and model.b_U.shape == (cfg.d_vocab,)
    )
    assert model.W_pos is None  # TransformerLens's T5 raises (test_tl_oracle.py; README "What differs")
    assert model.QK.shape == (L, H, dm, dm) and model.OV.shape == (L, H, dm, dm)
    assert model.QK_cross.shape == (2, H, dm, dm)
    # TransformerLens's labels (test_tl_oracle.py): encoder "EL{l}H{h}", then decoder "DL{l}H{h}"
    labels = model.all_head_labels()
    assert len(labels) == L * H and labels[H] == "EL1H0" and labels[-1] == f"DL1H{H - 1}"
    assert model.all_head_labels("decoder")[H] == "L1H0"
    assert model.all_head_labels("cross")[-1] == f"L1H{H - 1}_cross"
    # per-layer views are views: editing them edits the model
    with torch.no_grad():
        model.encoder[1].attn.W_Q[0, 0, 0] = 123.0
    assert model.encoder[1].attn.q_proj[0, 0] == 123.0


def test_weight_views_reproduce_hooked_activations():
    model = hooked_from(hf_t5("t5_v1_0"))
    tokens, mask, dec, _ = random_batch(model.cfg.d_vocab, 2, 7, 4)
    _, cache = model.run_with_cache(tokens, dec, one_zero_attention_mask=mask)
    x = cache["encoder.1.ln1.hook_normalized"] * model.encoder[1].ln1.w
    torch.testing.assert_close(
        torch.einsum("bpm,hmd->bphd", x, model.encoder[1].attn.W_Q), cache["encoder.1.attn.hook_q"], atol=1e-5, rtol=0
    )
    enc = cache["hook_encoder_out"]
    torch.testing.assert_close(
        torch.einsum("bpm,hmd->bphd", enc, model.W_K_cross[0]), cache["decoder.0.cross_attn.hook_k"], atol=1e-5, rtol=0
    )
    z = cache["decoder.1.attn.hook_z"]
    torch.testing.assert_close(
        torch.einsum("bphd,hdm->bpm", z, model.W_O[model.cfg.n_layers + 1]),
        cache["decoder.1.hook_attn_out"],
        atol=1e-5,
        rtol=0,
    )
    mlp_in = cache["encoder.0.ln2.hook_normalized"] * model.encoder[0].ln2.w  # what the MLP's W_in reads
    torch.testing.assert_close(cache["encoder.0.hook_mlp_in"], cache["encoder.0.hook_resid_mid"])  # pre-norm (TL)
    torch.testing.assert_close(mlp_in @ model.W_in[0], cache["encoder.0.mlp.hook_pre"], atol=1e-5, rtol=0)
    # QK circuit: the query-key bilinear form of layer 0 head 1 gives the (unbiased) scores
    resid = cache["encoder.0.ln1.hook_normalized"][0] * model.encoder[0].ln1.w  # [E, d_model]
    scores = resid @ model.QK[0, 1].AB @ resid.T
    q, k = cache["encoder.0.attn.hook_q"][0, :, 1], cache["encoder.0.attn.hook_k"][0, :, 1]
    torch.testing.assert_close(scores, q @ k.T, atol=1e-4, rtol=1e-5)
