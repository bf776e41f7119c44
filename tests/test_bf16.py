"""Every family and every token reduction runs forward and backward under bf16 autocast (what training uses on a
GPU), here on the CPU: finite loss, finite gradients reaching the patch embedding."""

import random

import pytest
import torch

from tokennas.config import build_model
from tokennas.models.schedule_vit import ScheduleViTConfig
from tokennas.spaces import get_space
from tokennas.spaces.base import Inputs

INPUTS = Inputs(32, 1, 10)
SPACES = ("psvit", "hvt", "crossvit", "quadtree", "stt", "tokens")


def mechanism(config) -> tuple:
    """What decides which code runs: the family and its categorical choices (pooling, reduction kind, scorer,
    head, sharing on or off), not the sizes."""
    fields = config.to_dict()
    return tuple(sorted((k, v if isinstance(v, str | bool) else bool(v)) for k, v in fields.items()
                        if isinstance(v, str | bool) or (isinstance(v, list | tuple) and k != "img_size")))


def one_per_mechanism(space_name: str, limit: int = 400) -> list:
    """The cheapest config of each mechanism among ``limit`` random grid points of the space."""
    space = get_space(space_name)
    points = list(space.grid(INPUTS))
    random.Random(0).shuffle(points)
    chosen: dict[tuple, tuple[int, object]] = {}
    for params in points[:limit]:
        config = space.build(params, INPUTS)
        cost = sum(config.flops_by_module().values())
        key = mechanism(config)
        if key not in chosen or cost < chosen[key][0]:
            chosen[key] = (cost, config)
    return [config for _, config in chosen.values()]


CASES = [pytest.param(config, id=f"{name}-{i}") for name in SPACES for i, config in enumerate(one_per_mechanism(name))]
CASES += [pytest.param(ScheduleViTConfig(img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=32,
                                         num_heads=1, depth=4, reduce_kind="prune_merge", keep_tokens=(64, 64, 40, 20),
                                         prune_tokens=(64, 64, 50, 30), share_attn=(1,)), id="layers-prune_merge")]


@pytest.mark.parametrize("config", CASES)
def test_forward_and_backward_under_bf16_autocast(config):
    torch.manual_seed(0)
    model = build_model(config).train()
    images = torch.randn(2, config.in_chans, config.img_size, config.img_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, config.num_classes)
    loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor([1, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_the_cases_cover_every_family_pooling_and_reduction():
    from tokennas.config import FAMILIES
    from tokennas.models.layers import POOL_KINDS, REDUCE_KINDS

    configs = [case.values[0] for case in CASES]
    assert {c.family for c in configs} == set(FAMILIES)
    vits = [c for c in configs if c.family == "schedule_vit"]
    assert {c.pool_kind for c in vits if c.pool_after} == set(POOL_KINDS)
    assert {c.reduce_kind for c in vits if c.keep_tokens} == set(REDUCE_KINDS)
    assert any(c.share_attn for c in vits)
