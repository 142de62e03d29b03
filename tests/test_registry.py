"""The hook registry: every HookPoint declares its axes, and everything that needs hook knowledge reads them."""

import re
from pathlib import Path

import pytest
import torch

import t5hooks.components as components
from t5hooks import HookedEncoderDecoder, HookedT5Config, HookPoint, act_name
from t5hooks.export.axes import activation_axes, step_activation_axes
from t5hooks.export.onnx_generation import is_encoder_side

README = Path(__file__).resolve().parents[1] / "README.md"
SIZES = {"batch": 2, "head": 2, "d_head": 3, "d_model": 12, "d_mlp": 10, "d_vocab": 16, "1": 1}
POSITIONS = {"encoder": 5, "decoder": 4}


def tiny(**overrides) -> HookedEncoderDecoder:
    cfg = dict(d_model=12, d_head=3, n_heads=2, d_mlp=10, n_layers=2, n_decoder_layers=3, d_vocab=16, seed=0)
    return HookedEncoderDecoder(HookedT5Config(**{**cfg, **overrides})).eval()


def declared_shape(model: HookedEncoderDecoder, name: str) -> tuple[int, ...]:
    spec = model.layout.spec(name)
    stacks = {"pos": spec.stack, "key_pos": spec.key_stack}
    return tuple(POSITIONS[stacks[a]] if a in stacks else SIZES[a] for a in spec.axes)


def run_all(model: HookedEncoderDecoder) -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (2, POSITIONS["encoder"]), generator=g)
    dec = torch.randint(0, 16, (2, POSITIONS["decoder"]), generator=g)
    _, cache = model.run_with_cache(tokens, dec)
    return cache


@pytest.mark.parametrize("options", [{}, {"gated_mlp": True, "use_attn_result": True}])
def test_declared_axes_are_the_real_shapes(options):
    """Each point's declared axes, sized by the run, give exactly the shape the forward produces."""
    model = tiny(**options)
    cache = run_all(model)
    assert set(cache) == set(model.hook_dict)
    for name, value in cache.items():
        assert tuple(value.shape) == declared_shape(model, name), name


def test_readme_hook_table_is_the_registry():
    text = README.read_text()
    found = re.search(r"<!-- hook table:.*?-->\n(.*?)\n<!-- end hook table -->", text, re.S)
    assert found, "README.md lost its generated hook table markers"
    assert found.group(1) == HookedEncoderDecoder.reference_layout().markdown_table(), (
        "README hook table and hook registry disagree; regenerate it with "
        "HookedEncoderDecoder.reference_layout().markdown_table()"
    )


def test_export_axes_and_sides_follow_declarations():
    model = tiny()
    assert activation_axes("encoder.1.attn.hook_pattern") == ("batch", None, "encoder", "encoder")
    assert activation_axes("decoder.0.cross_attn.hook_pattern") == ("batch", None, "decoder", "encoder")
    assert activation_axes("decoder.0.cross_attn.hook_k") == ("batch", "encoder", None, None)
    assert activation_axes("decoder.0.attn.rel_pos_hook") == (None, None, "decoder", "decoder")
    assert activation_axes("decoder_final_ln.hook_scale") == ("batch", "decoder", None)
    assert step_activation_axes("decoder.2.attn.hook_attn_scores", model.layout) == ("batch", None, None, "past + 1")
    assert step_activation_axes("decoder.2.attn.hook_k", model.layout) == ("batch", None, None, None)
    assert step_activation_axes("decoder.2.cross_attn.hook_pattern", model.layout) == ("batch", None, None, "encoder")
    encoder_side = {n for n in model.hook_dict if is_encoder_side(n, model.layout)}
    expected = {n for n in model.hook_dict if n.startswith(("encoder", "hook_embed", "hook_encoder_out"))}
    expected |= {f"decoder.{l}.cross_attn.hook_{kv}" for l in range(3) for kv in ("k", "v")}
    assert encoder_side == expected


def test_unknown_names_get_the_registry_notes():
    plain = tiny()
    with pytest.raises(ValueError, match=r"cfg.use_attn_result=True"):
        plain.resolve_names("encoder.0.attn.hook_result")
    with pytest.raises(ValueError, match=r"gated MLPs"):
        plain.resolve_names("decoder.1.mlp.hook_pre_linear")
    with pytest.raises(ValueError, match=r"layer 0 only"):
        plain.resolve_names("encoder.1.attn.rel_pos_hook")
    gated = tiny(gated_mlp=True)
    with pytest.raises(ValueError) as err:  # exists in this model, just not at layer 9: no configuration note
        gated.resolve_names("decoder.9.mlp.hook_pre_linear")
    assert "gated MLPs" not in str(err.value) and "did you mean" in str(err.value)


class ProbedMLP(components.MLP):
    """An MLP with one more hook point: the only change a new hook point needs."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.hook_act_sq = HookPoint(("batch", "pos", "d_mlp"))

    def forward(self, x, io=None):
        pre = self.hook_pre(torch.nn.functional.linear(x, self.in_proj), io)
        post = self.hook_post(self.act(pre), io)
        post = post + 0 * self.hook_act_sq(post * post, io)
        return torch.nn.functional.linear(post, self.out_proj)


def test_a_new_hook_point_is_one_declaration(monkeypatch):
    HookedEncoderDecoder.reference_layout()  # the stock registry, built (and cached) before the patch
    monkeypatch.setattr(components, "MLP", ProbedMLP)
    model = tiny()
    name = "decoder.2.mlp.hook_act_sq"
    assert name in model.hook_dict and "encoder.1.mlp.hook_act_sq" in model.hook_dict
    assert act_name("act_sq", 2, layout=model.layout) == name
    assert act_name("act_sq", 0, "encoder", layout=model.layout) == "encoder.0.mlp.hook_act_sq"
    assert activation_axes(name, model.layout) == ("batch", "decoder", None)
    assert step_activation_axes(name, model.layout) == ("batch", None, None)
    assert is_encoder_side("encoder.0.mlp.hook_act_sq", model.layout) and not is_encoder_side(name, model.layout)
    assert "hook_act_sq" in model.layout.markdown_table()
    with pytest.raises(ValueError, match="did you mean: decoder.2.mlp.hook_act_sq"):
        model.resolve_names("decoder.2.mlp.hook_act_sqq")
    cache = run_all(model)
    assert tuple(cache[name].shape) == declared_shape(model, name) == (2, 4, 10)
    out = model.capture([name])(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    assert tuple(out[name].shape) == (2, 4, 10)
    with pytest.raises(ValueError, match="unknown activation 'act_sq'"):
        act_name("act_sq", 0)  # the default registry (the stock model) does not have it


def test_hook_points_without_axes_are_refused_by_export():
    model = tiny()
    model.decoder[0].hook_extra = HookPoint()
    model.setup()
    with pytest.raises(ValueError, match="declares no axes"):
        activation_axes("decoder.0.hook_extra", model.layout)
