"""The `tokens` space: every grid point builds a valid, monotone schedule; most land within the budget."""

import itertools
import random

import optuna
import pytest

from tokennas.config import config_key
from tokennas.models.schedule_vit import ScheduleViTConfig
from tokennas.spaces import Inputs, get_space
from tokennas.spaces.tokens import MECHANISMS, SHAPES, TokensSpace, _Schedule

BUDGET = 15_000_000
IMAGENET = Inputs(img_size=224, in_chans=3, num_classes=1000)
DEIT_TINY_TRUNK = dict(embed_dim=192, depth=12, num_heads=3, patch_size=16)


def macs(config) -> int:
    return sum(config.flops_by_module().values())


def grid_configs(space, inputs):
    """Every choice of the schedule parameters and the config solved from it."""
    dims = space.schedule_dimensions(inputs)
    return [(params, space.schedule(params, inputs))
            for params in (dict(zip(dims, values, strict=True)) for values in itertools.product(*dims.values()))]


def test_every_grid_point_builds_a_monotone_valid_schedule_and_most_fit_the_budget():
    space, inputs = TokensSpace(budget=BUDGET), Inputs()
    built = grid_configs(space, inputs)
    assert 4000 <= len(built) <= 6000
    over = 0
    for params, config in built:
        assert isinstance(config, ScheduleViTConfig)  # constructed, so validated
        tokens = config.tokens_per_block()["tokens"]
        assert list(tokens) == sorted(tokens, reverse=True), params
        keep = config.keep_tokens
        assert list(keep) == sorted(keep, reverse=True), params
        assert not (keep and config.pool_after), params
        if params["mechanism"] == "pool":
            assert not keep and (not config.pool_after or config.pool_kind == "max2d")
        elif keep:
            assert config.reduce_kind == params["mechanism"]
        if params["attn_sharing"] == "none":
            assert config.share_attn == ()
        over += macs(config) > BUDGET
    assert over / len(built) < 0.45  # measured: 40% of the grid over 15M (large trunks), 60% within


def test_schedule_aims_at_the_cost_fraction():
    space, inputs = TokensSpace(budget=BUDGET), Inputs()
    params = dict(embed_dim=64, depth=8, num_heads=2, mechanism="merge", shape="constant", start=0.0,
                  attn_sharing="none")
    costs = [macs(space.schedule({**params, "cost": c}, inputs)) for c in (0.6, 0.8, 1.0)]
    assert costs == sorted(costs) and costs[0] <= 0.6 * BUDGET and costs[-1] <= BUDGET
    assert costs[-1] > 0.9 * BUDGET  # the mildest schedule within the target, not a much stronger one
    small = space.schedule({**params, "embed_dim": 48, "depth": 4, "cost": 1.0}, inputs)
    assert small.keep_tokens == () and small.pool_after == ()  # under budget unreduced: nothing to remove


def test_closed_form_schedule_cost_equals_the_config():
    rng = random.Random(0)
    for _ in range(60):
        trunk = dict(img_size=32, in_chans=1, num_classes=10, embed_dim=rng.choice([48, 96]),
                     depth=rng.choice([1, 2, 4, 6]), num_heads=2, mlp_ratio=4.0, patch_size=rng.choice([4, 8]),
                     class_token=rng.random() < 0.5)
        schedule = _Schedule(trunk, rng.choice(MECHANISMS), SHAPES[rng.choice(list(SHAPES))],
                             rng.randint(0, trunk["depth"] - 1), rng.choice(["none", "alternate"]))
        amount = rng.randint(0, schedule.max_amount)
        keep, pool_after, share_attn = schedule.layout(amount)
        config = ScheduleViTConfig(**trunk, keep_tokens=keep, pool_after=pool_after, share_attn=share_attn,
                                   pool_kind="max2d", reduce_kind="prune" if schedule.mechanism == "prune" else "merge")
        assert schedule.cost(amount) == macs(config), (trunk, schedule.mechanism, amount)


def test_fixed_trunk_has_single_choice_trunk_dimensions():
    space = TokensSpace(budget=800_000_000, trunk=DEIT_TINY_TRUNK)
    dims = space.schedule_dimensions(IMAGENET)
    assert dims["embed_dim"] == (192,) and dims["depth"] == (12,) and dims["num_heads"] == (3,)
    built = grid_configs(space, IMAGENET)
    assert all(c.patch_size == 16 and c.embed_dim == 192 and c.class_token for _, c in built)
    assert all(macs(c) <= 800_000_000 for _, c in built)  # DeiT-Ti is 1.26G; every shape gets below 0.8G


def test_fixed_head_count_keeps_only_widths_it_divides():
    dims = TokensSpace(trunk=dict(num_heads=3)).schedule_dimensions(Inputs())
    assert dims["num_heads"] == (3,) and all(d % 3 == 0 for d in dims["embed_dim"]) and dims["embed_dim"]


def test_registered_space_without_budget_aims_at_the_trunks_own_cost():
    space, inputs = get_space("tokens"), Inputs()
    assert isinstance(space, TokensSpace) and space.budget is None
    params = dict(embed_dim=64, depth=6, num_heads=2, mechanism="prune", shape="front", start=0.25,
                  attn_sharing="alternate")
    full = macs(space.schedule({**params, "cost": 1.0, "attn_sharing": "none"}, inputs))
    assert macs(space.schedule({**params, "cost": 0.6}, inputs)) <= 0.6 * full
    candidates = space.candidates(inputs)
    index = candidates.index(space.schedule({**params, "cost": 0.7}, inputs))
    assert space.suggest(optuna.trial.FixedTrial({"candidate": index}), inputs) == candidates[index]


def test_feasible_and_baseline():
    space, inputs = TokensSpace(budget=BUDGET), Inputs()
    feasible, smallest = space.feasible(BUDGET, inputs)
    assert len(feasible) > 1000 and smallest <= BUDGET
    solved = {config_key(c) for _, c in grid_configs(space, inputs) if macs(c) <= BUDGET}
    assert set(feasible) == solved and space.size(inputs) == len(solved)  # one index per distinct schedule within
    costs = [macs(c) for c in space.candidates(inputs)]
    assert costs == sorted(costs)  # ordered by MACs
    baseline = space.baseline(BUDGET, inputs)
    assert baseline is not None and macs(baseline) <= BUDGET


def test_candidate_index_is_checked_and_without_budget_covers_every_schedule():
    space, inputs = get_space("tokens"), Inputs()
    assert len(space.candidates(inputs)) == len({config_key(c) for _, c in grid_configs(space, inputs)})
    for bad in (-1, len(space.candidates(inputs)), "3", True):
        with pytest.raises(ValueError, match="`candidate`"):
            space.build({"candidate": bad}, inputs)


@pytest.mark.parametrize("kwargs,match", [(dict(budget=0), "`budget`"), (dict(trunk=dict(width=3)), "`trunk`")])
def test_invalid_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokensSpace(**kwargs)
