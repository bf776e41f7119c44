"""DiffRate-style prune-then-merge in ScheduleViT blocks: validation, costs, mechanics, merge equivalence, supernet."""

import random

import pytest
import torch

import tokennas
from tokennas.config import config_from_dict
from tokennas.flops import flops_by_module, fvcore_analysis
from tokennas.models.layers import TokenDrop, TokenMerge, TokenPruneMerge
from tokennas.models.schedule_vit import ScheduleViTConfig
from tokennas.models.supernet import build_supernet

BASE = dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, num_heads=2, depth=4)  # 64 patches


def prune_merge(**changes) -> ScheduleViTConfig:
    return ScheduleViTConfig(**{**BASE, "reduce_kind": "prune_merge", **changes})


@pytest.mark.parametrize("changes,match", [
    (dict(keep_tokens=(64, 50, 40, 30)), r"`prune_tokens` must have one entry per block \(`depth` = 4\) with "
                                         r"`reduce_kind` prune_merge, got 0"),
    (dict(keep_tokens=(64, 50, 40, 30), prune_tokens=(64, 50, 40)), "`prune_tokens` must have one entry per block"),
    (dict(prune_tokens=(64, 50, 40, 30)), "`prune_tokens` is only used with `reduce_kind` prune_merge and "
                                          "`keep_tokens` set; it must be empty otherwise"),
    (dict(reduce_kind="merge", keep_tokens=(64, 50, 40, 30), prune_tokens=(64, 50, 40, 30)),
     "`prune_tokens` is only used with"),
    (dict(keep_tokens=(64, 50, 40, 30), prune_tokens=(64, 45, 40, 30)),
     "`prune_tokens`: block 1 prunes to 45 patch tokens but `keep_tokens` keeps 50"),
    (dict(keep_tokens=(64, 50, 40, 30), prune_tokens=(64, 50, 51, 30)),
     "`prune_tokens`: block 2 prunes to 51 of the 50 patch tokens entering it"),
    (dict(keep_tokens=(64, 50, 40, 30), prune_tokens=(65, 50, 40, 30)),
     "`prune_tokens`: block 0 prunes to 65 of the 64 patch tokens entering it"),
    (dict(keep_tokens=(64, 50, 40, 0), prune_tokens=(64, 50, 40, 0)), "`keep_tokens`: block 3 keeps 0"),
    (dict(keep_tokens=(64, 50, 40, 9), prune_tokens=(64, 50, 40, 21)),
     "`keep_tokens`: block 3 merges its 21 pruned patch tokens to 9, but merging removes at most 11 per block"),
    (dict(keep_tokens=(64, 50, 50, 30), prune_tokens=(64, 50, 50, 30), share_attn=(1,)),
     "`keep_tokens`: block 1 reduces 64 to 50 patch tokens but is in `share_attn`"),
    (dict(keep_tokens=(64, 64, 40, 30), prune_tokens=(64, 64, 40, 30), pool_after=(1,)),
     "`keep_tokens` and `pool_after`"),
    (dict(reduce_kind="diffrate"), "`reduce_kind` must be one of merge, prune, prune_merge"),
])
def test_invalid_prune_merge_schedules_name_the_field_block_and_values(changes, match):
    with pytest.raises(ValueError, match=match):
        prune_merge(**changes)


def test_prune_merge_may_prune_any_amount_then_merge_at_most_half():
    config = prune_merge(keep_tokens=(64, 10, 2, 1), prune_tokens=(64, 21, 3, 2))  # 21 -> 10: the most, (21+1)//2
    assert config.tokens_per_block()["tokens"] == (65, 65, 11, 3)
    assert config.replace(class_token=False).tokens_per_block()["tokens"] == (64, 64, 10, 2)
    assert config.num_params() == ScheduleViTConfig(**BASE).num_params()
    assert prune_merge().flops_by_module() == ScheduleViTConfig(**BASE).flops_by_module()  # no schedule: no reduction
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="merges its 21 pruned patch tokens to 9"):
        config.replace(keep_tokens=(64, 9, 2, 1))


def random_prune_merge_config(rng: random.Random) -> ScheduleViTConfig:
    """A random valid prune_merge config: each block prunes, merges, both or neither; sharing where it is legal."""
    patch, side = rng.choice([2, 4, 8]), rng.choice([2, 3, 4, 5, 7])
    heads, depth = rng.choice([1, 2, 4]), rng.randint(1, 5)
    n, pruned, keep, shared, reduced_before = side**2, [], [], [], False
    for b in range(depth):
        step = rng.choice(["none", "prune", "merge", "both"]) if n > 1 else "none"
        if step == "none" and b > 0 and not reduced_before and rng.random() < 0.5:
            shared.append(b)
        p = rng.randint(1, n - 1) if step in ("prune", "both") else n
        k = rng.randint(max(1, p // 2), p - 1) if step in ("merge", "both") and p > 1 else p
        pruned.append(p)
        keep.append(k)
        reduced_before, n = k < n, k
    return ScheduleViTConfig(
        img_size=patch * side, patch_size=patch, in_chans=rng.choice([1, 3]), num_classes=rng.choice([5, 10]),
        embed_dim=heads * rng.choice([8, 16]), num_heads=heads, depth=depth, mlp_ratio=rng.choice([1.0, 4.0]),
        qkv_bias=rng.random() < 0.8, class_token=rng.random() < 0.5, reduce_kind="prune_merge",
        keep_tokens=tuple(keep), prune_tokens=tuple(pruned), share_attn=tuple(shared),
    )


def test_analytic_equals_fvcore_on_random_prune_merge_configs():
    rng = random.Random(0)
    seen = set()
    for _ in range(20):
        config = random_prune_merge_config(rng)
        seen.add((config.class_token, bool(config.share_attn)))
        assert flops_by_module(config, "fvcore") == flops_by_module(config, "analytic"), config
    assert len(seen) == 4  # with and without class token, with and without sharing


@pytest.mark.parametrize("class_token", [True, False])
def test_analytic_equals_fvcore_when_each_block_runs_one_step_or_both(class_token):
    # block 0 nothing, 1 shares, 2 prunes only, 3 merges only, 4 both
    config = prune_merge(depth=5, class_token=class_token, share_attn=(1,), keep_tokens=(64, 64, 40, 30, 13),
                         prune_tokens=(64, 64, 40, 40, 20))
    model = tokennas.build_model(config)
    kinds = [type(block.reduction) for block in model.blocks]
    assert kinds == [type(None), type(None), TokenDrop, TokenMerge, TokenPruneMerge]
    analysis = fvcore_analysis(model, config)
    assert {k: int(v) for k, v in analysis.by_module().items() if k in config.flops_by_module()} == \
        config.flops_by_module()
    assert dict(analysis.unsupported_ops()) == {}
    unpruned = config.replace(prune_tokens=(64, 64, 64, 40, 20))  # block 2 merges 64 -> 40 instead of dropping
    prefix, D = int(class_token), config.embed_dim
    assert config.flops_by_module()["blocks.2"] - unpruned.flops_by_module()["blocks.2"] == \
        (64 + prefix) * D - 32 * 32 * (D // 2)


@pytest.mark.parametrize("class_token", [True, False])
def test_prune_merge_without_pruning_is_merge(class_token):
    keep = (64, 40, 30, 20)
    merge = ScheduleViTConfig(**BASE, class_token=class_token, keep_tokens=keep, reduce_kind="merge")
    config = merge.replace(reduce_kind="prune_merge", prune_tokens=(64, 64, 40, 30))  # nothing pruned
    reference, model = tokennas.build_model(merge).eval(), tokennas.build_model(config).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    assert config.flops_by_module() == merge.flops_by_module()
    assert config.tokens_per_block() == merge.tokens_per_block()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
        pruning = config.replace(prune_tokens=(64, 50, 40, 30))  # the same keep_tokens, reached by pruning first
        other = tokennas.build_model(pruning).eval()
        other.load_state_dict(reference.state_dict())
        assert not torch.allclose(other(x), reference(x), atol=1e-4)


def test_drop_keeps_the_best_scored_tokens_and_their_sizes():
    torch.manual_seed(0)
    B, N, C, heads, hd = 2, 9, 6, 2, 3
    x, q, k = torch.randn(B, N, C), torch.randn(B, heads, N, hd), torch.randn(B, heads, N, hd)
    size = torch.arange(1.0, N + 1).reshape(1, N, 1).repeat(B, 1, 1)
    out, new_size = TokenDrop(keep=4, num_prefix_tokens=1, scale=hd**-0.5)(x, size, q, k)
    assert out.shape == (B, 5, C) and new_size.shape == (B, 5, 1)
    for i in range(B):
        score = torch.stack([torch.softmax(q[i, h, 0] @ k[i, h].T * hd**-0.5, dim=0) for h in range(heads)]).mean(0)
        best = sorted((score[1:].argsort(descending=True)[:4] + 1).tolist())  # positions of the 4 best patches
        assert torch.equal(out[i], x[i, [0, *best]])  # no fused token: the others are gone
        assert new_size[i].flatten().tolist() == [1.0, *(float(j + 1) for j in best)]
    assert TokenDrop(keep=4, num_prefix_tokens=1, scale=hd**-0.5)(x, None, q, k)[1] is None


def test_prune_merge_merges_the_survivors_by_their_own_keys():
    torch.manual_seed(2)
    B, N, C, heads, hd = 2, 11, 8, 2, 4
    x, q, k = torch.randn(B, N, C), torch.randn(B, heads, N, hd), torch.randn(B, heads, N, hd)
    size = torch.rand(B, N, 1) + 1
    out, new_size = TokenPruneMerge(prune=6, keep=4, num_prefix_tokens=1, scale=hd**-0.5)(x, size, q, k)
    drop = TokenDrop(keep=6, num_prefix_tokens=1, scale=hd**-0.5)
    kept = drop.kept(q, k)
    survivors = torch.cat([torch.zeros(B, 1, dtype=torch.long), kept + 1], dim=1)  # (B, 7) with the class token
    keys = torch.stack([k[i][:, survivors[i]] for i in range(B)])  # (B, heads, 7, hd): the survivors' keys per head
    expected, expected_size = TokenMerge(keep=4, num_prefix_tokens=1)(*drop(x, size, q, k), None, keys)
    assert out.shape == (B, 5, C)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new_size, expected_size)
    assert new_size.sum().item() < size.sum().item()  # the dropped tokens' sizes are gone


def test_drop_scores_by_the_mean_query_without_class_token():
    torch.manual_seed(1)
    x, q, k = torch.randn(1, 6, 4), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4)
    out, _ = TokenDrop(keep=2, num_prefix_tokens=0, scale=0.5)(x, None, q, k)
    score = torch.softmax(q[0, 0].mean(0) @ k[0, 0].T * 0.5, dim=0)
    assert torch.equal(out[0], x[0, sorted(score.argsort(descending=True)[:2].tolist())])


@pytest.mark.parametrize("class_token", [True, False])
def test_supernet_child_runs_prune_merge_as_the_standalone_model(class_token):
    config = prune_merge(depth=5, class_token=class_token, share_attn=(1,), keep_tokens=(64, 64, 40, 30, 13),
                         prune_tokens=(64, 64, 40, 40, 20))
    net = build_supernet([config], None).eval()
    standalone = tokennas.build_model(config).eval()
    standalone.load_state_dict(net.child_state_dict(config), strict=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = standalone(x)
        torch.testing.assert_close(net.child_model(config).eval()(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(net(x, config), expected, rtol=1e-6, atol=1e-6)


def test_forward_backward_in_training():
    config = prune_merge(depth=5, share_attn=(1,), keep_tokens=(64, 64, 40, 30, 13), prune_tokens=(64, 64, 40, 40, 20),
                         drop_path_rate=0.1)
    model = tokennas.build_model(config).train()
    out = model(torch.randn(4, 1, 32, 32))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
