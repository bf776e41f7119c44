"""CrossViT: paper figures, timm compatibility, costs against fvcore, validation, the ``crossvit`` space."""

import random

import pytest
import timm
import torch
from timm.models.crossvit import CrossVit

import tokennas
import tokennas.models.crossvit  # noqa: F401  (registers the family and presets)
import tokennas.spaces.crossvit  # noqa: F401  (registers the space)
from tokennas.config import load_config, save_config
from tokennas.flops import fvcore_analysis
from tokennas.models.crossvit import DAGGER_STRIDES, CrossViT, CrossViTConfig
from tokennas.spaces import Inputs, get_space

# Chen et al. 2021, Tables 1 and 3 (params in M, MACs in G).
PAPER = {
    "crossvit_tiny": (6.9, 1.6), "crossvit_small": (26.7, 5.6), "crossvit_base": (104.7, 21.2),
    "crossvit_9": (8.6, 1.8), "crossvit_15": (27.4, 5.8), "crossvit_18": (43.3, 9.0),
    "crossvit_9_dagger": (8.8, 2.0), "crossvit_15_dagger": (28.2, 6.1), "crossvit_18_dagger": (44.3, 9.5),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_presets_match_paper(name):
    params, macs = PAPER[name]
    assert tokennas.count_params(name) / 1e6 == pytest.approx(params, rel=0.03)
    assert tokennas.count_flops(name) / 1e9 == pytest.approx(macs, rel=0.03)


def assert_costs_match_trace(config: CrossViTConfig) -> None:
    model = CrossViT(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_params(), config
    analysis = fvcore_analysis(model, config)
    with torch.no_grad():
        traced = analysis.by_module()
    analytic = config.flops_by_module()
    for key, macs in analytic.items():
        assert traced[key] == pytest.approx(macs, rel=0.005), (key, config)
    assert traced[""] == sum(traced[key] for key in analytic), "MACs outside the keyed modules"
    assert dict(analysis.unsupported_ops()) == {}


# The other presets are traced by tests/test_presets.py; these two cover the resize and the dagger stem at 240px.
@pytest.mark.parametrize("name", ["crossvit_9", "crossvit_9_dagger"])
def test_preset_costs_match_fvcore(name):
    assert_costs_match_trace(load_config(name))


def random_config(rng: random.Random) -> CrossViTConfig:
    """A small random valid config: 2 or 3 branches, resized or not, any depths, fusions and stem."""
    branches = rng.choice([2, 2, 3])
    multi_conv = rng.random() < 0.25
    patches = [rng.choice(sorted(DAGGER_STRIDES) if multi_conv else [2, 3, 4, 8]) for _ in range(branches)]
    img_size = rng.choice([16, 24, 32])
    sizes = [p * max(1, img_size // p - rng.choice([0, 0, 1])) for p in patches]  # some branches resize
    heads = [rng.choice([1, 2]) for _ in range(branches)]
    return CrossViTConfig(
        img_size=img_size, in_chans=rng.choice([1, 3]), num_classes=rng.choice([3, 10]),
        branch_img_size=tuple(sizes), patch_size=tuple(patches),
        embed_dim=tuple(h * rng.choice([8, 12, 16]) for h in heads), num_heads=tuple(heads),
        depth=tuple(rng.choice([1, 1, 2]) for _ in range(branches)),
        mlp_ratio=tuple(rng.choice([1.0, 2.0, 2.5, 4.0]) for _ in range(branches)),
        num_encoders=rng.choice([1, 1, 2]), num_fusions=rng.choice([1, 2, 3]), multi_conv=multi_conv,
        qkv_bias=rng.random() < 0.8,
    )




@pytest.mark.slow  # about 45 s: fvcore traces of random configs
def test_costs_match_fvcore_on_random_configs(one_thread):
    rng = random.Random(0)
    for _ in range(200):
        assert_costs_match_trace(random_config(rng))


@pytest.mark.parametrize("name", ["crossvit_tiny", "crossvit_9", "crossvit_9_dagger"])
def test_loads_timm_weights_and_gives_same_logits(name):
    reference = timm.create_model(f"{name}_240", pretrained=False).eval()
    model = tokennas.build_model(name).eval()
    theirs = reference.state_dict()
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [(k, v.shape) for k, v in theirs.items()]
    model.load_state_dict(theirs, strict=True)
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() < 1e-5
        features = model.forward_features(x)
        assert [f.shape[:2] for f in features] == [(2, 401), (2, 197)]
        assert torch.allclose(model.forward_head(features, pre_logits=True),
                              reference.forward_head(reference.forward_features(x), pre_logits=True), atol=1e-5)


def test_several_fusions_and_resize_match_timm():
    config = CrossViTConfig(img_size=32, branch_img_size=(32, 24), patch_size=(4, 8), embed_dim=(32, 48),
                            num_heads=(2, 3), depth=(2, 1), mlp_ratio=(2.0, 3.0), num_encoders=2, num_fusions=2,
                            num_classes=5)
    reference = CrossVit(img_size=32, img_scale=(1.0, 0.75), patch_size=(4, 8), embed_dim=(32, 48),
                         depth=((2, 1, 2), (2, 1, 2)), num_heads=(2, 3), mlp_ratio=(2.0, 3.0, 1.0),
                         num_classes=5).eval()
    model = CrossViT(config).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() < 1e-5


def test_three_branches():
    config = CrossViTConfig(img_size=24, branch_img_size=(24, 24, 16), patch_size=(2, 4, 8), embed_dim=(16, 32, 48),
                            num_heads=(1, 2, 3), depth=(1, 2, 1), mlp_ratio=(2.0, 2.0, 2.0), num_classes=4)
    model = CrossViT(config).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, 24, 24))
        out = model.forward_head(features)
    assert [f.shape for f in features] == [(2, 145, 16), (2, 37, 32), (2, 5, 48)]
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    assert model.forward_head(features, pre_logits=True).shape == (2, 96)
    assert hasattr(model, "cls_token_2") and model.blocks[0].projs[2][2].out_features == 16  # branch 2 visits 0
    assert config.tokens_per_block() == {"branch0": (145,) * 3, "branch1": (37,) * 6, "branch2": (5,) * 3}


def test_tokens_per_block():
    assert load_config("crossvit_9").tokens_per_block() == {"small": (401,) * 3, "large": (197,) * 9}


@pytest.mark.parametrize("changes, field", [
    ({"embed_dim": (100, 384)}, "embed_dim"),
    ({"num_heads": (6,)}, "num_heads"),
    ({"patch_size": (12,), "branch_img_size": (240,), "embed_dim": (192,), "num_heads": (6,), "depth": (1,),
      "mlp_ratio": (4.0,)}, "patch_size"),
    ({"patch_size": (12, 15)}, "patch_size"),
    ({"depth": (1, 0)}, "depth"),
    ({"depth": (1, "4")}, "depth"),
    ({"mlp_ratio": (4.0, -1.0)}, "mlp_ratio"),
    ({"num_encoders": 0}, "num_encoders"),
    ({"num_fusions": 0}, "num_fusions"),
    ({"multi_conv": True, "patch_size": (12, 14), "branch_img_size": (240, 224)}, "multi_conv"),
    ({"depth": [1, 4]}, "depth"),
])
def test_invalid_configs_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        CrossViTConfig(**changes)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix):
    config = load_config("crossvit_9_dagger").replace(num_fusions=2, num_classes=10)
    again = load_config(save_config(config, tmp_path / f"c{suffix}"))
    assert again == config and again.flops_by_module() == config.flops_by_module()
    assert again.num_params() == config.num_params()


def test_timm_registry():
    model = timm.create_model("tokennas_crossvit_9", num_classes=7).eval()
    assert isinstance(model, CrossViT) and [h.out_features for h in model.head] == [7, 7]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 240, 240))
    assert out.shape == (1, 7) and torch.isfinite(out).all()
    assert "tokennas_crossvit_18_dagger" in timm.list_models("tokennas_crossvit*")


def test_space_builds_valid_configs():
    space, inputs = get_space("crossvit"), Inputs()
    dims = space.dimensions(inputs)
    assert space.size(inputs) < 100_000
    rng = random.Random(0)
    configs = [space.build({k: rng.choice(v) for k, v in dims.items()}, inputs) for _ in range(200)]
    assert all(c.img_size == 32 and c.in_chans == 1 and c.num_classes == 10 for c in configs)
    flops = [sum(c.flops_by_module().values()) for c in configs]
    assert min(flops) < 40e6 < max(flops)
    assert space.min_flops(inputs) < 5e6
    for config in configs[:4]:
        assert_costs_match_trace(config)
        model = CrossViT(config).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 1, 32, 32))
        assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("img_size", [8, 28, 224])
def test_space_is_valid_at_other_resolutions(img_size):
    space, inputs = get_space("crossvit"), Inputs(img_size=img_size, in_chans=3, num_classes=100)
    dims = space.dimensions(inputs)
    corners = [{k: v[0] for k, v in dims.items()}, {k: v[-1] for k, v in dims.items()}]
    for params in corners:
        assert space.build(params, inputs).img_size == img_size
