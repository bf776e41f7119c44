"""ScheduleViT: paper figures, timm compatibility, pooling and attention sharing."""

import random

import pytest
import timm
import torch

import tokennas
from tokennas.flops import flops_by_module
from tokennas.models.schedule_vit import ScheduleViT, ScheduleViTConfig

# Published (params in M, MACs in G): DeiT (Touvron et al. 2021), HVT (Pan et al. 2021, Table 2).
PAPER = {
    "deit_tiny": (5.7, 1.3), "deit_small": (22.05, 4.6), "deit_base": (86.6, 17.6),
    "hvt_ti_1": (5.74, 0.64), "hvt_s_1": (22.09, 2.40), "hvt_s_2": (22.11, 1.94),
    "hvt_s_3": (22.13, 1.62), "hvt_s_4": (22.14, 1.39),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_presets_match_papers(name):
    params, macs = PAPER[name]
    tol = 0.05 if name == "deit_tiny" else 0.02  # DeiT prints 5M/1.3G for Ti, rounded to one digit
    assert tokennas.count_params(name) / 1e6 == pytest.approx(params, rel=tol)
    assert tokennas.count_flops(name) / 1e9 == pytest.approx(macs, rel=tol)


def test_deit_small_figures():
    assert tokennas.count_flops("deit_small", method="fvcore") == pytest.approx(4.6e9, rel=0.02)
    assert tokennas.count_params("deit_small") == pytest.approx(22.05e6, rel=0.005)


def random_config(rng: random.Random) -> ScheduleViTConfig:
    """A random valid config; invalid draws are redrawn, so validation is exercised too."""
    while True:
        patch = rng.choice([2, 4, 8])
        heads = rng.choice([1, 2, 4])
        depth = rng.randint(1, 6)
        kwargs = dict(
            img_size=patch * rng.choice([3, 4, 5, 7, 8]), patch_size=patch, in_chans=rng.choice([1, 3]),
            num_classes=rng.choice([5, 10]), embed_dim=heads * rng.choice([8, 12, 16]), num_heads=heads,
            depth=depth, mlp_ratio=rng.choice([1.0, 2.0, 3.5, 4.0]), qkv_bias=rng.random() < 0.8,
            class_token=rng.random() < 0.5, pool_kind=rng.choice(["max1d", "max2d", "avg2d", "conv2d"]),
            pool_after=tuple(sorted(rng.sample(range(depth - 1), rng.randint(0, min(2, depth - 1))))),
            stage_pos_embed=rng.random() < 0.5,
            share_attn=tuple(sorted(rng.sample(range(1, depth), rng.randint(0, depth - 1)))) if depth > 1 else (),
        )
        try:
            return ScheduleViTConfig(**kwargs)
        except ValueError:
            continue


def test_analytic_matches_fvcore_on_random_configs():
    rng = random.Random(0)
    for _ in range(100):  # 100 keeps make test in its time
        config = random_config(rng)
        analytic = flops_by_module(config, "analytic")
        traced = flops_by_module(config, "fvcore")
        assert sum(traced.values()) == pytest.approx(sum(analytic.values()), rel=0.005), config
        model = ScheduleViT(config)
        assert sum(p.numel() for p in model.parameters()) == config.num_params(), config


@pytest.mark.parametrize("timm_name,ours", [("deit_small_patch16_224", "deit_small"),
                                            ("deit_tiny_patch16_224", "deit_tiny")])
def test_identity_schedule_loads_timm_weights(timm_name, ours):
    reference = timm.create_model(timm_name, pretrained=False).eval()
    model = tokennas.build_model(ours).eval()
    theirs = reference.state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in theirs.items()}
    model.load_state_dict(theirs, strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() < 1e-5


def test_average_head_normalises_then_averages_as_hvt_does():
    """HVT's code (zhuang-group/HVT, models.py) applies the final norm to every token and then averages;
    that is timm's average head with ``fc_norm=False``, not timm's default (average, then norm)."""
    config = ScheduleViTConfig(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2, num_classes=10,
                               class_token=False)
    reference = timm.models.VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2,
                                              num_classes=10, class_token=False, global_pool="avg",
                                              fc_norm=False).eval()
    model = ScheduleViT(config).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() < 1e-5


def test_attention_sharing_removes_qk_params_and_flops():
    base = ScheduleViTConfig(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    shared = base.replace(share_attn=(1, 3))
    D, N = 64, 65
    assert base.num_params() - shared.num_params() == 2 * 2 * (D * D + D)  # q and k weights and biases, twice
    removed = {b: base.flops_by_module()[f"blocks.{b}"] - shared.flops_by_module()[f"blocks.{b}"] for b in (1, 3)}
    assert removed == {1: 2 * N * D * D + N * N * D, 3: 2 * N * D * D + N * N * D}  # Q/K projections and QK^T
    traced = flops_by_module(shared, "fvcore")
    assert traced["blocks.1"] == shared.flops_by_module()["blocks.1"]
    model = ScheduleViT(shared)
    assert not hasattr(model.blocks[1].attn, "qkv") and hasattr(model.blocks[1].attn, "v")
    assert sum(p.numel() for p in model.parameters()) == shared.num_params()


def test_shared_block_applies_previous_attention_map():
    config = ScheduleViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, share_attn=(1,))
    model = ScheduleViT(config).eval()
    x = torch.randn(1, 17, 32)
    with torch.no_grad():
        y0, attn, _ = model.blocks[0](x, return_attn=True)
        assert attn.shape == (1, 2, 17, 17)
        assert torch.allclose(attn.sum(-1), torch.ones(1, 2, 17))
        y1, passed_on, _ = model.blocks[1](y0, attn)
        assert passed_on is attn
        a = model.blocks[1].attn
        v = a.v(model.blocks[1].norm1(y0)).reshape(1, 17, 2, 16).transpose(1, 2)
        expected_attn_out = a.proj((attn @ v).transpose(1, 2).reshape(1, 17, 32))
        h = y0 + expected_attn_out
        assert torch.allclose(y1, h + model.blocks[1].mlp(model.blocks[1].norm2(h)), atol=1e-6)


def test_sharing_across_a_pooling_is_rejected_naming_the_block():
    with pytest.raises(ValueError, match="block 4"):
        ScheduleViTConfig(embed_dim=64, num_heads=2, depth=6, pool_after=(3,), share_attn=(4,))


@pytest.mark.parametrize("field,value,match", [
    ("num_heads", 5, "num_heads"), ("pool_kind", "median", "pool_kind"), ("pool_after", (11,), "pool_after"),
    ("patch_size", 15, "patch_size"), ("share_attn", (0,), "share_attn"), ("depth", "12", "depth"),
])
def test_invalid_configs_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        ScheduleViTConfig(**{field: value})


def test_hvt_pooling_schedule():
    tokens = tokennas.load_config("hvt_s_4").tokens_per_block()["tokens"]
    assert tokens == (196, 97, 97, 97, 48, 48, 48, 23, 23, 23, 11, 11)
    psvit = tokennas.load_config("psvit_2d_tiny").tokens_per_block()["tokens"]
    assert psvit == (197,) * 4 + (50,) * 4 + (17,) * 4


def test_timm_registry():
    model = timm.create_model("tokennas_hvt_s_1", num_classes=7)
    assert isinstance(model, ScheduleViT) and model.head.out_features == 7
    assert "tokennas_deit_small" in timm.list_models("tokennas_*")
