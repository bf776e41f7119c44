"""Token merging (ToMe) and pruning (EViT) inside ScheduleViT blocks: costs, timm identity, mechanics, validation."""

import random

import pytest
import timm
import torch

import tokennas
from tokennas.config import config_from_dict
from tokennas.flops import flops_by_module, fvcore_analysis
from tokennas.models.layers import Block, TokenMerge, TokenPrune
from tokennas.models.schedule_vit import ScheduleViT, ScheduleViTConfig


@pytest.mark.parametrize("name", ["deit_tiny_tome", "deit_tiny_evit"])
def test_presets_analytic_equals_fvcore(name):
    config = tokennas.load_config(name)
    analysis = fvcore_analysis(tokennas.build_model(config), config)
    per_module = analysis.by_module()
    assert {k: int(per_module[k]) for k in config.flops_by_module()} == config.flops_by_module()
    assert int(analysis.total()) == tokennas.count_flops(name)
    assert dict(analysis.unsupported_ops()) == {}


def test_preset_schedules():
    tome = tokennas.load_config("deit_tiny_tome")
    assert tome.tokens_per_block()["tokens"] == tuple(197 - 8 * b for b in range(12))
    evit = tokennas.load_config("deit_tiny_evit")
    assert evit.tokens_per_block()["tokens"] == (197,) * 4 + (138,) * 3 + (97,) * 3 + (68,) * 2
    assert tome.num_params() == evit.num_params() == tokennas.count_params("deit_tiny")
    assert config_from_dict(tome.to_dict()) == tome and config_from_dict(evit.to_dict()) == evit


def random_reducing_config(rng: random.Random) -> ScheduleViTConfig:
    """A random valid config with merging or pruning, class token on or off, sharing where it is legal."""
    patch, side = rng.choice([2, 4, 8]), rng.choice([2, 3, 4, 5, 7])
    heads, depth, kind = rng.choice([1, 2, 4]), rng.randint(1, 6), rng.choice(["merge", "prune"])
    n, keep, shared, reduced_before = side**2, [], [], False
    for b in range(depth):
        reduces = n > 1 and rng.random() < 0.5
        if not reduces and b > 0 and not reduced_before and rng.random() < 0.4:
            shared.append(b)  # sees the same tokens as block b - 1 and has no reduction of its own
        if reduces:
            n = rng.randint(max(1, n // 2) if kind == "merge" else 1, n - 1)  # merging removes at most ceil(n/2)
        keep.append(n)
        reduced_before = reduces
    return ScheduleViTConfig(
        img_size=patch * side, patch_size=patch, in_chans=rng.choice([1, 3]), num_classes=rng.choice([5, 10]),
        embed_dim=heads * rng.choice([8, 12, 16]), num_heads=heads, depth=depth, mlp_ratio=rng.choice([1.0, 2.0, 4.0]),
        qkv_bias=rng.random() < 0.8, class_token=rng.random() < 0.5, keep_tokens=tuple(keep), reduce_kind=kind,
        share_attn=tuple(shared),
    )


def test_analytic_equals_fvcore_on_random_configs():
    rng = random.Random(0)
    kinds = set()
    for _ in range(200):
        config = random_reducing_config(rng)
        kinds.add((config.reduce_kind, config.class_token, bool(config.share_attn)))
        assert flops_by_module(config, "fvcore") == flops_by_module(config, "analytic"), config
    assert len(kinds) == 8  # both kinds, with and without class token, with and without sharing


@pytest.mark.parametrize("kind", ["merge", "prune"])
def test_identity_schedule_gives_timm_logits(kind):
    reference = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    config = tokennas.load_config("deit_tiny").replace(keep_tokens=(196,) * 12, reduce_kind=kind)
    model = ScheduleViT(config).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    assert config.num_params() == tokennas.count_params("deit_tiny")
    assert config.flops_by_module() == tokennas.load_config("deit_tiny").flops_by_module()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() < 1e-5


def test_merging_two_identical_tokens_gives_one_token_of_size_two():
    torch.manual_seed(0)
    B, N, C, heads, hd = 1, 7, 8, 2, 4  # class token + 6 patch tokens: A = 1, 3, 5 and B = 2, 4, 6 (positions)
    x, k = torch.randn(B, N, C), torch.randn(B, heads, N, hd)
    x[:, 4], k[:, :, 4] = x[:, 3], k[:, :, 3]  # the second A token duplicates the second B token
    merged, size = TokenMerge(keep=5, num_prefix_tokens=1)(x, None, None, k)
    assert merged.shape == (B, 6, C) and size.flatten().tolist() == [1, 1, 1, 1, 2, 1]
    # class token, unmerged A tokens in order (positions 1 and 5), then B tokens (2, 4, 6)
    assert torch.equal(merged, x[:, [0, 1, 5, 2, 4, 6]])


def test_merge_is_a_size_weighted_average():
    x = torch.tensor([[[1.0], [3.0], [5.0]]])  # no class token; A = tokens 0 and 2 (values 1, 5), B = token 1
    k = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.1]], [[0.0, 1.0]]]]).transpose(1, 2)  # (B, nh=1, N=3, hd=2)
    size = torch.tensor([[[3.0], [1.0], [1.0]]])
    merged, new_size = TokenMerge(keep=2, num_prefix_tokens=0)(x, size, None, k)
    assert new_size.flatten().tolist() == [1.0, 4.0]  # token 2 stays; token 0 (size 3) joins token 1
    assert merged.flatten().tolist() == pytest.approx([5.0, (3 * 1.0 + 3.0) / 4])


@pytest.mark.parametrize("return_attn", [False, True])
def test_proportional_attention_makes_a_merged_pair_act_as_the_duplicates(return_attn):
    """ToMe's property: a token of size 2 is attended to as its two identical source tokens would be."""
    torch.manual_seed(0)
    block = Block(16, 2).eval()
    x = torch.randn(1, 5, 16)
    duplicated = torch.cat([x, x[:, 3:4]], dim=1)  # token 3 twice
    size = torch.tensor([1.0, 1.0, 1.0, 2.0, 1.0]).reshape(1, 5, 1)
    with torch.no_grad():
        expected = block(duplicated, return_attn=return_attn)[0]
        out, _, passed_size = block(x, return_attn=return_attn, size=size)
        plain = block(x, return_attn=return_attn)[0]
    assert passed_size is size
    assert torch.allclose(out, expected[:, :5], atol=1e-5)
    assert not torch.allclose(plain, expected[:, :5], atol=1e-3)


def test_pruning_keeps_the_best_scored_tokens_and_fuses_the_rest():
    torch.manual_seed(0)
    B, N, C, heads, hd = 2, 9, 6, 2, 3
    x, q, k = torch.randn(B, N, C), torch.randn(B, heads, N, hd), torch.randn(B, heads, N, hd)
    out, size = TokenPrune(keep=4, num_prefix_tokens=1, scale=hd**-0.5)(x, None, q, k)
    assert out.shape == (B, 1 + 4, C) and size is None
    for i in range(B):
        score = torch.stack([torch.softmax(q[i, h, 0] @ k[i, h].T * hd**-0.5, dim=0) for h in range(heads)]).mean(0)
        score = score[1:]  # patch tokens
        best = sorted(score.argsort(descending=True)[:3].tolist())
        rest = [j for j in range(N - 1) if j not in best]
        weights = score[rest] / score[rest].sum()
        assert torch.equal(out[i, 0], x[i, 0])
        assert torch.equal(out[i, 1:4], x[i, 1:][best])
        assert torch.allclose(out[i, 4], (weights[:, None] * x[i, 1:][rest]).sum(0), atol=1e-6)


def test_pruning_without_class_token_scores_by_the_mean_query():
    torch.manual_seed(1)
    x, q, k = torch.randn(1, 6, 4), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4)
    out, _ = TokenPrune(keep=3, num_prefix_tokens=0, scale=0.5)(x, None, q, k)
    score = torch.softmax(q[0, 0].mean(0) @ k[0, 0].T * 0.5, dim=0)
    best = sorted(score.argsort(descending=True)[:2].tolist())
    assert torch.equal(out[0, :2], x[0, best])


@pytest.mark.parametrize("changes,match", [
    (dict(keep_tokens=(60, 20, 20, 20)), "`keep_tokens`: block 1 keeps 20 of 60 patch tokens, but merging removes "
                                         "at most 30 per block"),
    (dict(keep_tokens=(64, 50, 50, 50), share_attn=(1,)), "`keep_tokens`: block 1 .*`share_attn`"),
    (dict(keep_tokens=(64, 50, 50, 50), share_attn=(2,)), "`share_attn`: block 2"),
    (dict(keep_tokens=(64, 50, 50, 50), pool_after=(1,)), "`keep_tokens` and `pool_after`"),
    (dict(keep_tokens=(64, 50, 50)), "`keep_tokens` must have one entry per block"),
    (dict(keep_tokens=(64, 50, 60, 50)), "`keep_tokens`: block 2 keeps 60 of 50"),
    (dict(keep_tokens=(64, 50, 0, 0), reduce_kind="prune"), "`keep_tokens`: block 2 keeps 0"),
    (dict(keep_tokens=(65, 64, 64, 64)), "`keep_tokens`: block 0 keeps 65 of 64"),
    (dict(reduce_kind="drop"), "`reduce_kind` must be one of merge, prune"),
])
def test_invalid_schedules_name_the_field_and_block(changes, match):
    base = dict(img_size=32, patch_size=4, embed_dim=32, num_heads=2, depth=4)
    with pytest.raises(ValueError, match=match):
        ScheduleViTConfig(**base, **changes)


def test_pruning_may_remove_more_than_merging():
    config = ScheduleViTConfig(img_size=32, patch_size=4, embed_dim=32, num_heads=2, depth=4, reduce_kind="prune",
                               keep_tokens=(64, 10, 1, 1))
    assert config.tokens_per_block()["tokens"] == (65, 65, 11, 2)


@pytest.mark.parametrize("kind", ["merge", "prune"])
@pytest.mark.parametrize("class_token", [True, False])
def test_forward_backward_on_a_batch(kind, class_token):
    torch.manual_seed(0)
    config = ScheduleViTConfig(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, num_heads=2,
                               depth=5, keep_tokens=(64, 64, 40, 25, 13), share_attn=(1,), reduce_kind=kind,
                               class_token=class_token, drop_path_rate=0.1)
    model = ScheduleViT(config).train()
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
    out = model(torch.randn(4, 1, 32, 32))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
