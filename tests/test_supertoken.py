"""STT (Farooq et al. 2021, arXiv 2111.13156): locality, closed-form costs against fvcore, presets, space."""

from __future__ import annotations

import dataclasses
import random

import pytest
import timm
import torch

import tokennas.models.supertoken  # noqa: F401  (registers the family and presets)
import tokennas.spaces.stt  # noqa: F401  (registers the space)
from tokennas.config import PRESETS, build_model, load_config, save_config
from tokennas.flops import flops_by_module
from tokennas.models.supertoken import SuperTokenConfig
from tokennas.spaces import Inputs, get_space

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's


SMALL = dict(img_size=32, in_chans=1, num_classes=10, patch_size=4, window_size=2, embed_dim=32, num_heads=2)


def _window_reverse(config, x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B * W, M^2, D) in window layout -> (B, h*w, D) in raster order."""
    g, M, D = config.grid, config.window_size, x.shape[-1]
    return x.reshape(batch, g // M, g // M, M, M, D).transpose(2, 3).reshape(batch, g * g, D)


def _patch_outputs(model: torch.nn.Module, image: torch.Tensor, blocks: int) -> torch.Tensor:
    """Patch tokens after the first ``blocks`` blocks, (B, h*w, D) in raster order."""
    full = model.blocks
    model.blocks = full[:blocks]
    try:
        tokens = model.forward_tokens(image)
    finally:
        model.blocks = full
    return _window_reverse(model.config, tokens[:, 1:], image.shape[0])


@torch.no_grad()
def test_locality() -> None:
    """Window attention keeps a perturbation inside its window; global super-token attention carries it out."""
    torch.manual_seed(0)
    model = build_model(SuperTokenConfig(**SMALL, depth=2, global_blocks=(1,))).eval()
    image = torch.randn(1, 1, 32, 32)
    perturbed = image.clone()
    perturbed[..., :4, :4] += 1.0  # patch (0, 0) of the 8x8 grid, in the 2x2 window of patches (0..1, 0..1)
    grid = 8
    changed = (_patch_outputs(model, image, 1) - _patch_outputs(model, perturbed, 1)).abs().amax(-1)[0] > 1e-6
    same_window = {r * grid + c for r in (0, 1) for c in (0, 1)}
    assert set(changed.nonzero().flatten().tolist()) == same_window  # block 0 has no global attention
    far = (7 * grid + 7, 0 * grid + 5)  # patches in other windows
    changed = (_patch_outputs(model, image, 2) - _patch_outputs(model, perturbed, 2)).abs().amax(-1)[0] > 1e-6
    assert all(changed[i] for i in far)  # block 1 opens with global super-token attention
    local_only = build_model(SuperTokenConfig(**SMALL, depth=2, global_blocks=())).eval()
    changed = (_patch_outputs(local_only, image, 2) - _patch_outputs(local_only, perturbed, 2)).abs().amax(-1)[0]
    assert set((changed > 1e-6).nonzero().flatten().tolist()) == same_window


def _assert_costs_match(config: SuperTokenConfig) -> None:
    analytic = flops_by_module(config)
    traced = flops_by_module(config, "fvcore")
    assert traced.get("(other)", 0) <= 0.005 * sum(traced.values())
    for name, value in analytic.items():
        assert abs(value - traced[name]) <= 0.005 * max(traced[name], 1), (name, value, traced[name])
    assert config.num_params() == sum(p.numel() for p in build_model(config).parameters())


@pytest.mark.parametrize("name", ["stt_s25", "stt_tiny"])
def test_costs_presets(name: str) -> None:
    _assert_costs_match(PRESETS[name][0])


def _random_config(rng: random.Random) -> SuperTokenConfig:
    img_size = rng.choice((8, 12, 16, 24))
    patch = rng.choice([p for p in (1, 2, 3, 4, 6, 8) if img_size % p == 0 and img_size // p <= 12])
    grid = img_size // patch
    heads = rng.choice((1, 2, 3))
    depth = rng.randint(1, 3)
    return SuperTokenConfig(
        img_size=img_size, in_chans=rng.choice((1, 3)), num_classes=rng.choice((1, 5, 10)), patch_size=patch,
        window_size=rng.choice([m for m in range(1, grid + 1) if grid % m == 0]), depth=depth, num_heads=heads,
        embed_dim=heads * rng.choice((4, 8)), mlp_ratio=rng.choice((1.0, 2.0, 2.5, 4.0)), qkv_bias=rng.random() < 0.5,
        global_blocks=tuple(b for b in range(depth) if rng.random() < 0.5),
    )


def test_costs_random_configs() -> None:
    rng = random.Random(0)
    for _ in range(200):
        _assert_costs_match(_random_config(rng))


def test_stt_s25_params() -> None:
    assert abs(load_config("stt_s25").num_params() - 49e6) <= 0.03 * 49e6


@pytest.mark.parametrize("changes, field", [
    (dict(window_size=3), "`window_size`"),  # 3 does not divide the 8x8 grid
    (dict(patch_size=5), "`patch_size`"),
    (dict(num_heads=3), "`num_heads`"),
    (dict(depth=0), "`depth`"),
    (dict(mlp_ratio=0.0), "`mlp_ratio`"),
    (dict(depth=2, global_blocks=(2,)), "`global_blocks`"),
    (dict(depth=3, global_blocks=(2, 1)), "`global_blocks`"),
    (dict(global_blocks=[1]), "`global_blocks`"),
])
def test_invalid_config(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SuperTokenConfig(**{**SMALL, "depth": 2, **changes})


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix: str) -> None:
    config = SuperTokenConfig(**SMALL, depth=3, global_blocks=(1, 2), mlp_ratio=2.5)
    loaded = load_config(save_config(config, tmp_path / f"stt{suffix}"))
    assert loaded == config and loaded.num_params() == config.num_params()


def test_space() -> None:
    space, inputs = get_space("stt"), Inputs()
    assert space.size(inputs) < 100_000
    assert space.min_flops(inputs) < 10e6  # the acceptance search runs at --flops 40M
    rng = random.Random(0)
    for img_size in (32, 28, 64, 224):
        dims = space.dimensions(Inputs(img_size=img_size))
        for _ in range(50):
            config = space.build({k: rng.choice(v) for k, v in dims.items()}, Inputs(img_size=img_size))
            assert config.grid % config.window_size == 0 and config.tokens_per_block()["super"][0] >= 1
    for params in space.grid(inputs):  # every combination at the default inputs builds
        space.build(params, inputs)


@torch.no_grad()
def test_forward() -> None:
    config = dataclasses.replace(PRESETS["stt_tiny"][0], img_size=32, in_chans=1, num_classes=10, patch_size=4)
    model = build_model(config).eval()
    features = model.forward_features(torch.randn(2, 1, 32, 32))
    assert features.shape == (2, config.num_windows, 64)
    logits = model.forward_head(features)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert model.forward_head(features, pre_logits=True).shape == (2, 64)
    assert config.tokens_per_block() == {"patch": (64,) * 6, "super": (16,) * 6}


@torch.no_grad()
def test_timm_create_model() -> None:
    model = timm.create_model("tokennas_stt_tiny", num_classes=5).eval()
    out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 5) and torch.isfinite(out).all()
