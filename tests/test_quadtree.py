"""Quadformer and its quadtree tokenizer: budgets, saliency, exact greedy splitting, uniform-ViT equivalence, costs."""

import gzip
import heapq
import random

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import tokennas
import tokennas.models.quadformer  # noqa: F401  (registers the family and presets)
import tokennas.spaces.quadtree  # noqa: F401  (registers the space)
from tokennas.config import load_config, save_config
from tokennas.data import FASHION_MNIST_DIR
from tokennas.flops import flops_by_module, fvcore_analysis
from tokennas.models.quadformer import Quadformer, QuadformerConfig
from tokennas.models.quadtree import draw_mosaic, select_splits, tokenizer_from_config
from tokennas.models.schedule_vit import ScheduleViT, ScheduleViTConfig
from tokennas.spaces import Inputs, get_space

FMNIST = FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz"  # Debian's package or $FASHION_MNIST_DIR
# Zero-MAC ops the feature (lcnet's hard-swish) and random scorers trace that flops.ZERO_COST_OPS lacks so far.
PENDING_ZERO_COST = ("aten::hardswish", "aten::hardswish_", "aten::rand")
TINY = dict(in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)


def fashion_mnist(n: int, size: int) -> torch.Tensor:
    """The first ``n`` Fashion-MNIST test images, in [0, 1], bilinearly upsampled to ``size``."""
    with gzip.open(FMNIST) as f:
        _, _, rows, cols = np.frombuffer(f.read(16), ">i4")
        pixels = np.frombuffer(f.read(n * rows * cols), np.uint8).reshape(n, 1, rows, cols)
    return F.interpolate(torch.from_numpy(pixels.copy()).float() / 255, size=(size, size), mode="bilinear")


def patch_size_map(mosaic, min_patch: int, img_size: int) -> torch.Tensor:
    """(B, H, W) side of the patch covering each pixel; -1 where none does, 0 where two do."""
    B = mosaic.centres.shape[0]
    size = torch.full((B, img_size, img_size), -1.0)
    count = torch.zeros(B, img_size, img_size)
    for b in range(B):
        for (cx, cy), s in zip(mosaic.centres[b].tolist(), mosaic.scales[b].tolist(), strict=True):
            x0, y0, side = round((cx - s / 2) * min_patch), round((cy - s / 2) * min_patch), round(s * min_patch)
            size[b, y0:y0 + side, x0:x0 + side] = side
            count[b, y0:y0 + side, x0:x0 + side] += 1
    return torch.where(count == 1, size, torch.where(count == 0, -1.0, 0.0))


def test_mosaic_spends_the_budget_on_the_object():
    config = QuadformerConfig(img_size=64, patch_size=4, min_patch_size=4, max_patch_size=16, budget=100, **TINY)
    images = fashion_mnist(16, 64)
    mosaic = tokenizer_from_config(config)(images)
    assert mosaic.pixels.shape == (16, 100, 16) and mosaic.mask is None
    sizes = patch_size_map(mosaic, 4, 64)
    assert (sizes > 0).all(), "the patches must tile the image exactly: no gap, no overlap"
    assert not (sizes == 16).all(dim=(1, 2)).any() and (sizes == 4).any(dim=(1, 2)).all()
    obj = images[:, 0] > 0.2
    background = F.max_pool2d(images, 9, 1, 4)[:, 0] == 0  # pixels with nothing within 4px
    for b in range(16):  # where there is background to spare (a flat garment filling the frame is not salient)
        if obj[b].float().mean() < 0.4:
            assert sizes[b][obj[b]].mean() < 0.75 * sizes[b][background[b]].mean()
    assert sizes[obj].mean() < 0.6 * sizes[background].mean()
    # a token holds its patch area-resized to 4x4 pixels
    b, t = 3, 57
    (cx, cy), s = mosaic.centres[b, t].tolist(), int(mosaic.scales[b, t])
    x0, y0 = round((cx - s / 2) * 4), round((cy - s / 2) * 4)
    patch = F.avg_pool2d(images[b:b + 1, :, y0:y0 + 4 * s, x0:x0 + 4 * s], s)
    torch.testing.assert_close(mosaic.pixels[b, t], patch.flatten())


def sequential_greedy(scores: list[torch.Tensor], num_splits: int) -> list[torch.Tensor]:
    """The paper's algorithm for one image: split the most salient leaf, one split at a time."""
    values = [s.tolist() for s in scores]
    heap = [(-v, 0, i, j) for i, row in enumerate(values[0]) for j, v in enumerate(row)]
    heapq.heapify(heap)
    split = [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    for _ in range(num_splits):
        _, level, i, j = heapq.heappop(heap)
        split[level][i, j] = True
        if level + 1 < len(scores):
            for ci, cj in ((2 * i, 2 * j), (2 * i, 2 * j + 1), (2 * i + 1, 2 * j), (2 * i + 1, 2 * j + 1)):
                heapq.heappush(heap, (-values[level + 1][ci][cj], level + 1, ci, cj))
    return split


def test_batched_splitting_equals_sequential_greedy():
    rng = random.Random(0)
    for _ in range(30):
        g0, levels, B = rng.choice([1, 2, 3]), rng.choice([1, 2, 3, 4]), 6
        scores = [torch.rand(B, g0 * 2**level, g0 * 2**level) for level in range(levels)]
        nodes = sum(s[0].numel() for s in scores)
        num_splits = torch.randint(0, nodes + 1, (B,))
        batched = select_splits(scores, num_splits)
        for b in range(B):
            for got, want in zip(batched, sequential_greedy([s[b] for s in scores], int(num_splits[b])), strict=True):
                assert torch.equal(got[b], want)


def test_tied_scores_still_give_a_quadtree():
    """Flat background scores 0 everywhere: splits stay parent-first and their number exact."""
    scores = [torch.randint(0, 3, (4, 2 * 2**level, 2 * 2**level)).float() for level in range(3)]
    num_splits = torch.tensor([0, 5, 11, 20])  # 4 + 16 nodes may split
    split = select_splits(scores, num_splits)
    assert sum(s.sum(dim=(1, 2)) for s in split).tolist() == num_splits.tolist()
    for parent, child in zip(split, split[1:], strict=False):
        assert not (child & ~parent.repeat_interleave(2, 1).repeat_interleave(2, 2)).any()


def test_per_image_budgets_give_a_mask():
    config = QuadformerConfig(img_size=32, patch_size=4, min_patch_size=4, max_patch_size=16, budget=40, **TINY)
    mosaic = tokenizer_from_config(config)(fashion_mnist(3, 32), budgets=torch.tensor([4, 40, 64]))
    assert mosaic.pixels.shape == (3, 64, 16)
    assert mosaic.mask.sum(1).tolist() == [4, 40, 64]
    assert (mosaic.pixels[~mosaic.mask] == 0).all()
    with pytest.raises(ValueError, match="nearest valid budgets: 40, 43"):
        tokenizer_from_config(config)(fashion_mnist(1, 32), budgets=torch.tensor([41]))


def test_full_grid_budget_is_the_uniform_vit():
    """Full budget: the mosaic is the 8x8 grid of 4px patches, so a ScheduleViT with the same weights and its
    learned ``pos_embed`` set to the Quadformer's fixed sin-cos + scale values gives the same logits."""
    kw = dict(img_size=32, in_chans=1, num_classes=10, patch_size=4, embed_dim=64, depth=3, num_heads=4)
    quad = Quadformer(QuadformerConfig(min_patch_size=4, max_patch_size=16, budget=64, **kw)).eval()
    vit = ScheduleViT(ScheduleViTConfig(**kw)).eval()
    images = fashion_mnist(4, 32)
    mosaic = quad.tokenizer(images)
    assert (mosaic.levels == 2).all()
    ys, xs = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    torch.testing.assert_close(mosaic.centres[0], torch.stack([xs, ys], -1).view(64, 2) + 0.5)
    state = {k: v for k, v in quad.state_dict().items() if k.split(".")[0] in ("cls_token", "blocks", "norm", "head")}
    state["patch_embed.proj.weight"] = quad.patch_embed.weight.detach().view(64, 1, 4, 4)
    state["patch_embed.proj.bias"] = quad.patch_embed.bias.detach()
    pos = quad.pos_embed(mosaic.centres[:1], mosaic.levels[:1]).detach()
    state["pos_embed"] = torch.cat([torch.zeros(1, 1, 64), pos], dim=1)
    vit.load_state_dict(state)
    with torch.no_grad():
        assert (quad(images) - vit(images)).abs().max() < 1e-5


@pytest.fixture(scope="module")
def lcnet_checkpoint(tmp_path_factory):
    """A randomly initialised RGB lcnet_050 state dict, standing in for the user's checkpoint."""
    path = tmp_path_factory.mktemp("weights") / "lcnet_050.pth"
    torch.save(timm.create_model("lcnet_050").state_dict(), path)
    return str(path)


GEOMETRIES = {
    "3 levels": dict(img_size=32, patch_size=4, min_patch_size=4, max_patch_size=16, budget=40),
    "resized patches": dict(img_size=64, patch_size=4, min_patch_size=8, max_patch_size=32, budget=34),
    "uniform grid": dict(img_size=32, patch_size=2, min_patch_size=2, max_patch_size=2, budget=256),
}


@pytest.mark.parametrize("scorer, geometry", [("pixel-blur", "3 levels"), ("pixel-blur", "resized patches"),
                                              ("pixel-blur", "uniform grid"), ("random", "3 levels"),
                                              ("feature", "3 levels"), ("feature", "resized patches")])
def test_costs_match_fvcore_and_params_are_exact(scorer, geometry, lcnet_checkpoint):
    config = QuadformerConfig(scorer=scorer, scorer_checkpoint=lcnet_checkpoint if scorer == "feature" else "",
                              **GEOMETRIES[geometry], **TINY)
    analytic = flops_by_module(config, "analytic")
    assert (analytic["tokenizer"] > 0) == (scorer == "feature" and config.num_levels > 1)
    model = tokennas.build_model(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
    analysis = fvcore_analysis(model, config).set_op_handle(**dict.fromkeys(PENDING_ZERO_COST))
    traced = analysis.by_module()
    for key, value in analytic.items():
        assert traced[key] == pytest.approx(value, rel=0.01), key
    assert analysis.total() == pytest.approx(sum(analytic.values()), rel=0.01)
    assert dict(analysis.unsupported_ops()) == {}


def test_flops_by_module_fvcore_agrees_with_the_closed_form():
    config = QuadformerConfig(**GEOMETRIES["3 levels"], **TINY)
    assert flops_by_module(config, "fvcore") == flops_by_module(config, "analytic")


def test_feature_scorer_uses_the_users_weights(lcnet_checkpoint):
    config = QuadformerConfig(img_size=32, patch_size=4, min_patch_size=4, max_patch_size=16, budget=40,
                              scorer="feature", scorer_checkpoint=lcnet_checkpoint, **TINY)
    model = tokennas.build_model(config).train()
    saved = torch.load(lcnet_checkpoint, weights_only=True)
    cnn = model.tokenizer.scorer.cnn
    torch.testing.assert_close(cnn.blocks[1][0].conv_pw.weight, saved["blocks.1.0.conv_pw.weight"])
    torch.testing.assert_close(cnn.conv_stem.weight, saved["conv_stem.weight"].sum(1, keepdim=True))  # RGB -> gray
    assert not cnn.training and not any(p.requires_grad for p in cnn.parameters())
    model(fashion_mnist(4, 32)).sum().backward()
    assert model.patch_embed.weight.grad is not None


def test_feature_scorer_without_weights_fails_clearly(tmp_path):
    kw = dict(img_size=32, patch_size=4, min_patch_size=4, max_patch_size=16, budget=40, scorer="feature", **TINY)
    with pytest.raises(ValueError, match="`scorer_checkpoint` is required for scorer 'feature'"):
        QuadformerConfig(**kw)
    with pytest.raises(ValueError, match="`scorer_checkpoint` file .* does not exist"):
        tokennas.build_model(QuadformerConfig(scorer_checkpoint=str(tmp_path / "missing.pth"), **kw))
    torch.save({"conv_stem.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="is not a lcnet_050 state dict"):
        tokennas.build_model(QuadformerConfig(scorer_checkpoint=str(tmp_path / "other.pth"), **kw))


@pytest.mark.parametrize("budget, nearest", [(101, "100, 103"), (15, "16"), (300, "256"), (-2, "16")])
def test_invalid_budget_names_the_nearest_valid_ones(budget, nearest):
    with pytest.raises(ValueError, match=f"`budget` {budget} cannot be reached.*nearest valid budgets: {nearest}$"):
        QuadformerConfig(img_size=64, patch_size=4, min_patch_size=4, max_patch_size=16, budget=budget, **TINY)


@pytest.mark.parametrize("field, value, message", [
    ("max_patch_size", 24, "`max_patch_size` \\(24\\) must be `min_patch_size` \\(4\\) times a power of 2"),
    ("patch_size", 3, "`patch_size` \\(3\\) must divide `min_patch_size`"),
    ("scorer", "saliency", "`scorer` must be one of pixel-blur, feature, random"),
    ("embed_dim", 34, "`embed_dim` \\(34\\) must be a multiple of 4"),
])
def test_invalid_fields_are_named(field, value, message):
    kw = dict(img_size=64, patch_size=4, min_patch_size=4, max_patch_size=16, budget=100, **TINY)
    with pytest.raises(ValueError, match=message):
        QuadformerConfig(**{**kw, field: value})


def test_yaml_round_trip(tmp_path, lcnet_checkpoint):
    for config in (load_config("quadformer_s_256_100"),
                   QuadformerConfig(img_size=32, patch_size=4, min_patch_size=4, max_patch_size=32, budget=22,
                                    scorer="feature", scorer_checkpoint=lcnet_checkpoint, **TINY)):
        for suffix in (".yaml", ".json"):
            again = load_config(save_config(config, tmp_path / f"config{suffix}"))
            assert again == config and again.num_params() == config.num_params()
            assert tokennas.count_flops(again) == tokennas.count_flops(config)


@pytest.mark.parametrize("scorer", ["pixel-blur", "random"])
def test_forward_shape_and_finite(scorer):
    config = QuadformerConfig(img_size=32, patch_size=2, min_patch_size=2, max_patch_size=16, budget=52,
                              scorer=scorer, **TINY)
    model = tokennas.build_model(config)
    out = model(fashion_mnist(5, 32))
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    assert model.forward_head(model.forward_features(fashion_mnist(2, 32)), pre_logits=True).shape == (2, 32)


def test_space_builds_every_draw_and_reaches_small_configs():
    space, inputs = get_space("quadtree"), Inputs(img_size=32, in_chans=1, num_classes=10)
    dims = space.dimensions(inputs)
    assert space.size(inputs) < 100_000 and "feature" not in dims["scorer"]
    rng = random.Random(0)
    for _ in range(200):
        config = space.build({k: rng.choice(v) for k, v in dims.items()}, inputs)
        assert config.img_size == 32 and config.budget + 1 == config.tokens_per_block()["tokens"][0]
    assert space.min_flops(inputs) < 4e6
    assert "feature" in tokennas.spaces.quadtree.QuadtreeSpace("weights.pth").dimensions(inputs)["scorer"]


def test_presets_cost_what_the_uniform_vit_with_as_many_tokens_costs():
    assert tokennas.count_flops("quadformer_s_256_196") == tokennas.count_flops("deit_small")
    assert tokennas.count_params("quadformer_s_256_196") < tokennas.count_params("deit_small")


def test_draw_mosaic(tmp_path):
    config = QuadformerConfig(img_size=32, patch_size=4, min_patch_size=4, max_patch_size=16, budget=40, **TINY)
    path = draw_mosaic(config, fashion_mnist(4, 28), tmp_path / "mosaic.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
