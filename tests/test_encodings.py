"""One encoding per candidate: parameter vectors a space asks for per distinct config it builds within a budget.

The figure is the number of distinct asked vectors (``Space.asked``: the grid point without its unused
parameters) whose config is within the budget, divided by the number of distinct configs among them. 1.0 means
the sampler never spends a proposal on a second name of one candidate. Where a space stays above 1.0, the test
checks that its duplicates are exactly the ones the space's choice lists cannot avoid (see each case).
"""

import collections
import random

import optuna
import pytest

from tokennas.config import config_key
from tokennas.search.studies.storage import check_encoding
from tokennas.spaces import Inputs, get_space
from tokennas.spaces.base import ask
from tokennas.spaces.tokens import TokensSpace

INPUTS = Inputs(32, 1, 10)


def macs(config) -> int:
    return sum(config.flops_by_module().values())


def duplicates(space, budget):
    """(vectors per distinct config, the groups of distinct asked vectors that build one feasible config)."""
    groups = collections.defaultdict(set)
    for params in space.grid(INPUTS):
        config = space.build(params, INPUTS)
        if macs(config) <= budget:
            groups[config_key(config)].add(tuple(sorted(space.asked(params, INPUTS).items())))
    assert groups, "nothing fits: the figure would be empty"
    ratio = sum(map(len, groups.values())) / len(groups)
    return ratio, [[dict(v) for v in g] for g in groups.values() if len(g) > 1]


def varying(group):
    return {k for k in group[0] if len({str(v.get(k)) for v in group}) > 1}


@pytest.mark.parametrize("name,space,budget", [
    ("tokens", TokensSpace(budget=15_000_000), 15_000_000),
    ("tokens", get_space("tokens"), 10**12),  # no budget: every schedule the generator builds
    ("crossvit", get_space("crossvit"), 30_000_000),
])
def test_one_vector_per_config(name, space, budget):
    ratio, groups = duplicates(space, budget)
    assert ratio == 1.0 and not groups, groups[:3]


# Spaces whose choice lists are fixed (Optuna's categoricals cannot change their choices between trials, and a
# changing int range takes the parameter out of multivariate TPE's joint model), so that a choice can coincide
# with another for some earlier answers. Each case: the budget, the dimension that coincides, why, and an upper
# bound on the figure (measured, rounded up).
def psvit_sharing(group):  # stages of at most 2 blocks: sharing all but a stage's first block is every second one
    return varying(group) == {"attn_sharing"} and {v["attn_sharing"] for v in group} == {"alternate", "per-stage"}


def hvt_stages(group):  # more stages than the depth or the tokens allow build the schedule of fewer
    return varying(group) == {"pool_stages"} and min(v["pool_stages"] for v in group) >= 1


def stt_pattern(group):  # at depth 2 every pattern but none is global attention in block 1
    return varying(group) == {"global_pattern"} and {v["depth"] for v in group} == {2}


def quadtree_budget(group):  # token targets beyond the full grid of min patches snap to that grid
    return varying(group) == {"budget"} and len(group) <= 3


@pytest.mark.parametrize("name,budget,explained,bound", [
    ("psvit", 30_000_000, psvit_sharing, 1.12),
    ("hvt", 30_000_000, hvt_stages, 1.18),
    ("stt", 1_990_000, stt_pattern, 2.5),
    ("stt", 30_000_000, stt_pattern, 1.27),
    ("quadtree", 30_000_000, quadtree_budget, 1.12),
])
def test_remaining_duplicates_are_the_explained_ones(name, budget, explained, bound):
    ratio, groups = duplicates(get_space(name), budget)
    unexplained = [g for g in groups if not explained(g)]
    assert not unexplained, unexplained[:3]
    assert 1.0 <= ratio <= bound


@pytest.mark.parametrize("name", ["psvit", "hvt", "stt", "quadtree", "crossvit", "tokens"])
def test_suggest_asks_exactly_the_asked_parameters(name):
    """A trial fixed to the asked part of a grid point builds that point's config: every parameter left out is
    without effect, and nothing else is asked (FixedTrial raises for a parameter it was not given)."""
    space = get_space(name) if name != "tokens" else TokensSpace(budget=15_000_000)
    points = list(space.grid(INPUTS))
    for params in random.Random(0).sample(points, 200):
        trial = optuna.trial.FixedTrial(space.asked(params, INPUTS))
        assert space.suggest(trial, INPUTS) == space.build(params, INPUTS), params
        assert set(trial.params) == set(space.asked(params, INPUTS))
        asked = space.asked(params, INPUTS)  # and `completed` gives back a choice that builds the same config
        assert space.build(space.completed(asked, INPUTS), INPUTS) == space.build(params, INPUTS)
        if asked:  # one answered dimension left out: not a whole proposal
            assert space.completed(dict(list(asked.items())[1:]), INPUTS) is None


def test_evenly_spaced_numbers_are_ordered_distributions():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    assert ask(trial, "depth", (4, 6, 8, 10, 12)) in (4, 6, 8, 10, 12)
    for _ in range(20):
        assert ask(study.ask(), "cost", (0.6, 0.7, 0.8, 0.9, 1.0)) in (0.6, 0.7, 0.8, 0.9, 1.0)  # exact choices
    ask(trial, "embed_dim", (64, 96, 128, 192))
    ask(trial, "kind", ("max2d", "avg2d"))
    ask(trial, "flag", (False, True))
    kinds = {name: type(d).__name__ for name, d in trial.distributions.items()}
    assert kinds == {"depth": "IntDistribution", "embed_dim": "CategoricalDistribution",
                     "kind": "CategoricalDistribution", "flag": "CategoricalDistribution"}
    assert trial.distributions["depth"].step == 2
    assert type(study.trials[-1].distributions["cost"]).__name__ == "FloatDistribution"


@pytest.mark.parametrize("name", ["psvit", "tokens"])
def test_a_study_in_the_old_encoding_is_refused_and_one_in_the_new_continues(name):
    space = get_space(name)
    old = space.schedule_dimensions(INPUTS) if name == "tokens" else space.dimensions(INPUTS)
    before = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):  # every dimension a categorical, as before this encoding
        trial = before.ask()
        for dim, choices in old.items():
            trial.suggest_categorical(dim, list(choices))
        before.tell(trial, 0.5)
    with pytest.raises(ValueError, match="another encoding"):
        check_encoding(before, space.distributions(INPUTS), name)
    now = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        trial = now.ask()
        space.suggest(trial, INPUTS)
        now.tell(trial, 0.5)
    check_encoding(now, space.distributions(INPUTS), name)
