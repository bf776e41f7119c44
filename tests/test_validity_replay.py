"""benchmarks/bench_validity.py's replays run the search's own BudgetSearcher against the committed ground-truth
table: short replays, checked for what the search does (repeats told their original's outcome and never trained
twice, exactly the budget of distinct configs trained, the stall fallback counted, Ray's ASHA and Optuna's pruners
stopping candidates at their rungs)."""

import importlib.util
import sys
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tokennas.config import config_key
from tokennas.search.studies import study as S

BENCH = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_validity", BENCH / "bench_validity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_validity"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_validity", None)
    sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def table(bench):
    return bench.load_table(BENCH / "ground_truth_psvit30M.csv")[0]


def method(bench, name):
    return next(m for m in bench.METHODS + bench.VARIANTS + bench.SCREENS if m.label == name)


def test_the_table_is_the_spaces_feasible_set(bench, table):
    lookup, feasible = bench.table_lookup(table)
    assert len(lookup) == len(table) == 68
    assert set(feasible) == set(lookup)


def test_a_replay_trains_the_budget_of_distinct_configs_and_tells_repeats_their_originals_outcome(bench, table):
    replay = bench.Replay(table, method(bench, "tpe+asha"), seed=0, budget=20, rung=2)
    trace = replay.run()
    trials = replay.study.trials
    trained = [t for t in trials if S.trained(t)]
    keys = [config_key(t.user_attrs["config"]) for t in trained]
    assert len(trace) == len(trained) == len(set(keys)) == 20  # never trained twice
    assert set(keys) <= set(replay.lookup)
    repeats = [t for t in trials if S.is_repeat(t)]
    assert replay.repeats == len(repeats) > 0
    for t in repeats:
        original = trials[t.user_attrs["repeat_of"]]
        assert config_key(t.user_attrs["config"]) == config_key(original.user_attrs["config"])
        assert t.state == original.state and t.value == original.value  # one trial at a time: never a liar
        if original.state == TrialState.PRUNED:  # its rung: the intermediate values, then PRUNED
            assert t.intermediate_values == original.intermediate_values
    # each trained config cost the epochs it reported: the table's curve up to where Ray's ASHA stopped it
    epochs = 0
    for t in trained:
        curve = replay.lookup[config_key(t.user_attrs["config"])].curve
        steps = sorted(t.intermediate_values)
        assert steps == list(range(1, len(steps) + 1))
        assert [t.intermediate_values[s] for s in steps] == pytest.approx(list(curve[:len(steps)]))
        assert (t.state == TrialState.PRUNED) == (len(steps) < len(curve))
        if t.state == TrialState.PRUNED:
            assert len(steps) in (2, 6)  # the search's rungs: epoch 2, then 3x
        if config_key(t.user_attrs["config"]) in replay.top_two and replay.first_top == epochs:
            first_top = t.number
        epochs += len(steps)
    assert trace[-1][0] == epochs
    # the table's top two configs: the first one trained, how many and how many stopped early
    top = [t for t in trained if config_key(t.user_attrs["config"]) in replay.top_two]
    best_two = sorted(table["hi"], reverse=True)[:2]
    assert sorted((replay.lookup[k].hi for k in replay.top_two), reverse=True) == best_two
    assert replay.top_proposed == len(top) and replay.top_stopped == sum(t.state == TrialState.PRUNED for t in top)
    assert len(top) == 2 and first_top == top[0].number  # this seed trains both
    assert replay.stopped == sum(t.state == TrialState.PRUNED for t in trained) > 0
    assert replay.proposals == len(trials) == len(trained) + len(repeats) + replay.infeasible


def test_the_stall_fallback_hands_untried_candidates_and_is_counted(bench, table):
    replay = bench.Replay(table, "random", seed=1, budget=30, rung=2, stall=2)  # by label, as bench_oneshot asks
    trace = replay.run()
    handed = [t for t in replay.study.trials if t.user_attrs.get("fallback")]
    assert replay.fallbacks == len(handed) > 0
    assert all(S.trained(t) for t in handed)  # feasible and untried when handed out
    assert len(trace) == 30
    assert trace[-1][0] == 30 * 8  # no scheduler: every candidate trains its 8 epochs


def test_optunas_hyperband_pruner_stops_candidates_in_the_replay(bench, table):
    replay = bench.Replay(table, method(bench, "tpe+hyperband"), seed=0, budget=12, rung=2)
    trace = replay.run()
    pruned = [t for t in replay.study.trials if S.trained(t) and t.state == TrialState.PRUNED]
    assert replay.stopped == len(pruned) > 0
    assert all(max(t.intermediate_values) < 8 for t in pruned)
    assert len(trace) == 12 and trace[-1][0] < 12 * 8
    # the same seed replays the same search: Hyperband's brackets hash the study's name, which the seed sets
    again = bench.Replay(table, method(bench, "tpe+hyperband"), seed=0, budget=12, rung=2)
    assert again.run() == trace

    def brackets(r):
        return [r.study.pruner._get_bracket_id(r.study, t) for t in r.study.trials]

    assert brackets(again) == brackets(replay) and len(set(brackets(replay))) > 1


def test_the_default_method_is_the_searchs(bench):
    assert [m.label for m in bench.METHODS if bench.is_default(m)] == ["tpe+asha"]
    assert bench.label(method(bench, "tpe+asha")) == "tpe+asha (default)"


def test_a_shorter_start_up_reaches_the_sampler_under_skiptried(bench, table):
    """`tpe+asha s3`: TPE models after 3 feasible candidates, not make_sampler's 6 (the count is set on the
    FeasibleStartup that SkipTried wraps), so the same seed proposes another search; set on the wrapper, where
    nothing reads it, the two replays were the same."""
    replays = {m: bench.Replay(table, method(bench, m), seed=0, budget=20, rung=2) for m in ("tpe+asha", "tpe+asha s3")}
    for replay in replays.values():
        replay.run()
    startups = {m: r.study.sampler.sampler for m, r in replays.items()}
    assert isinstance(startups["tpe+asha s3"], S.FeasibleStartup)
    assert (startups["tpe+asha"].n_startup, startups["tpe+asha s3"].n_startup) == (6, 3)
    proposed = {m: [t.params for t in r.study.trials] for m, r in replays.items()}
    assert proposed["tpe+asha"][:3] == proposed["tpe+asha s3"][:3]  # the same random start
    assert proposed["tpe+asha"] != proposed["tpe+asha s3"]


def test_the_screens_change_what_they_name(bench, table):
    """Each screen (`--screens`) reaches the piece it names, in a replay that still trains the budget of distinct
    table configs: TPE's arguments reach the sampler, the start-up counts reach its start-up, the QMC start-up
    replaces the random one, the widths are asked in order, the feasible-only proposals tell fewer over-budget
    points, and ASHA cuts at its reduction factor."""
    import optuna

    replays = {m.label: bench.Replay(table, m, seed=0, budget=12, rung=2) for m in bench.SCREENS}
    replays["tpe+asha"] = bench.Replay(table, method(bench, "tpe+asha"), seed=0, budget=12, rung=2)
    for replay in replays.values():
        assert len(replay.run()) == 12
    model = {label: r.study.sampler.sampler.model for label, r in replays.items()}
    assert model["tpe+asha ei128"]._n_ei_candidates == 128 and model["tpe+asha"]._n_ei_candidates == 24
    assert model["tpe+asha prior0.5"]._parzen_estimator_parameters.prior_weight == 0.5
    assert model["tpe+asha good2"]._gamma is bench.two_good and model["tpe+asha group"]._group
    assert model["tpe+asha quarter"]._gamma is bench.a_quarter and model["tpe+asha ei8"]._n_ei_candidates == 8
    assert not model["tpe+asha indep"]._multivariate and model["tpe+asha"]._multivariate
    assert [replays[f"tpe+asha s{n}"].study.sampler.sampler.n_startup for n in (2, 4)] == [2, 4]
    startup = {label: r.study.sampler.sampler.startup for label, r in replays.items()}
    assert isinstance(startup["tpe+asha qmc"], optuna.samplers.QMCSampler)
    assert isinstance(startup["tpe+asha"], optuna.samplers.RandomSampler)
    widths = {t.distributions["embed_dim"] for t in replays["tpe+asha ordered"].study.trials}
    assert widths == {optuna.distributions.IntDistribution(0, 3)}
    assert replays["tpe+asha feasible"].infeasible < replays["tpe+asha"].infeasible
    factors = [replays[label].scheduler._reduction_factor for label in ("tpe+asha rf4", "tpe+asha")]
    assert factors == [4, 3]
    assert bench.is_default(method(bench, "tpe+asha")) and not any(bench.is_default(m) for m in bench.SCREENS)
    with pytest.raises(ValueError, match="TPESampler arguments"):
        S.make_sampler("random", 0, 8, group=True)


def test_what_the_compute_target_asks_of_an_oracle(bench, table):
    """`after_startup`: the table's best proposed first trains all 8 epochs (ASHA lets its first trial through);
    every random start-up and every miss before it costs epochs, and a config at the target ends the count."""
    best = table["hi"].max()
    seeds = range(30)
    assert bench.after_startup(table, best, 0, 0, seeds) == 8
    costs = [bench.after_startup(table, best, 6, misses, seeds) for misses in range(4)]
    assert 8 < costs[0] <= costs[1] <= costs[2] <= costs[3] < float("inf")
    # a lower target is reached no later: the start-up may already hold a config at it
    assert bench.after_startup(table, table["hi"].median(), 6, 0, seeds) < costs[0]
