"""The searcher contract, without a Ray cluster: suggest, results, completion, pickling, resume."""

import pickle

import optuna
import pytest
from optuna.trial import TrialState

from tokennas.search import study as S
from tokennas.search.searcher import BudgetSearcher
from tokennas.spaces import Inputs, get_space

BUDGET = 30_000_000


def make(tmp_path, objective="acc", sampler="tpe", budget=BUDGET):
    study = S.open_study(tmp_path, objective, S.make_sampler(sampler, 0, 8), create=True)
    return BudgetSearcher(study, get_space("psvit"), Inputs(), budget, max_epochs=3)


def test_suggest_only_hands_ray_feasible_candidates(tmp_path):
    searcher = make(tmp_path)
    suggestions = [searcher.suggest(f"t{i}") for i in range(6)]
    assert all(s["flops"] <= BUDGET for s in suggestions)
    trials = searcher.study.trials
    infeasible = [t for t in trials if S.is_infeasible(t)]
    assert len(infeasible) == searcher.infeasible
    for t in infeasible:  # told to the sampler as finished and constrained, never trained
        assert t.state == TrialState.COMPLETE and t.constraints["flops"] > 0 and t.user_attrs["flops"] > BUDGET
    running = [t for t in trials if t.state == TrialState.RUNNING]
    assert sorted(t.number for t in running) == sorted(s["number"] for s in suggestions)
    assert all(t.constraints["flops"] <= 0 for t in running)


def test_results_complete_prune_and_fail(tmp_path):
    searcher = make(tmp_path)
    ids = ["a", "b", "c"]
    numbers = {i: searcher.suggest(i)["number"] for i in ids}
    for epoch, acc in enumerate([0.5, 0.6], start=1):
        searcher.on_trial_result("a", {"val_acc": acc, "epoch": epoch})
    searcher.on_trial_complete("a", {"val_acc": 0.7, "epoch": 3, "time_total_s": 2.0})
    searcher.on_trial_complete("b", {"val_acc": 0.4, "epoch": 1})  # ASHA stopped it after one epoch
    searcher.on_trial_complete("c", None, error=True)
    trials = {t.number: t for t in searcher.study.trials}
    a, b, c = (trials[numbers[i]] for i in ids)
    assert a.state == TrialState.COMPLETE and a.value == 0.7 and a.intermediate_values == {1: 0.5, 2: 0.6, 3: 0.7}
    assert b.state == TrialState.PRUNED and b.user_attrs["epochs"] == 1 and b.intermediate_values == {1: 0.4}
    assert c.state == TrialState.FAIL
    assert searcher.live == {}


def test_pareto_mode_keeps_intermediate_results(tmp_path):
    searcher = make(tmp_path, objective="pareto", sampler="nsga2")
    number = searcher.suggest("a")["number"]
    searcher.on_trial_result("a", {"val_acc": 0.3, "epoch": 1})
    searcher.on_trial_result("a", {"val_acc": 0.5, "epoch": 2})
    searcher.on_trial_complete("a", {"val_acc": 0.6, "epoch": 3})  # Ray's last result comes only here
    trial = searcher.study.trials[number]
    assert trial.user_attrs["history"] == [0.3, 0.5, 0.6]
    assert trial.values == [0.6, float(trial.user_attrs["flops"])]


def test_searcher_pickles_for_ray(tmp_path):
    searcher = make(tmp_path)
    searcher.suggest("a")
    again = pickle.loads(pickle.dumps(searcher))
    again.on_trial_complete("a", {"val_acc": 0.9, "epoch": 3})
    trained = [t for t in searcher.study.trials if not S.is_infeasible(t)]
    assert any(t.state == TrialState.COMPLETE and t.value == 0.9 for t in trained)


def test_resume_marks_interrupted_trials_failed_and_asks_again(tmp_path):
    searcher = make(tmp_path)
    suggestion = searcher.suggest("a")
    study = S.open_study(tmp_path, "acc")  # as a new process would see it after a kill
    assert S.resume_interrupted(study) == 1
    assert study.trials[suggestion["number"]].state == TrialState.FAIL
    retry = study.ask()
    get_space("psvit").suggest(retry, Inputs())
    assert retry.params == study.trials[suggestion["number"]].params


def test_sampler_learns_from_the_budget(tmp_path):
    """With the constraint told, TPE's later proposals are over budget less often than random ones."""
    counts = {}
    for sampler in ("tpe", "random"):
        (tmp_path / sampler).mkdir()
        searcher = make(tmp_path / sampler, sampler=sampler, budget=10_000_000)
        for i in range(25):
            searcher.suggest(str(i))
            searcher.on_trial_complete(str(i), {"val_acc": 0.5, "epoch": 3})
        counts[sampler] = searcher.infeasible
    assert counts["tpe"] < counts["random"]


@pytest.mark.parametrize("name", ["psvit", "hvt"])
def test_space_builds_every_sampled_candidate(name):
    space, inputs = get_space(name), Inputs()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(200):
        config = space.suggest(study.ask(), inputs)
        assert (config.img_size, config.in_chans, config.num_classes) == (32, 1, 10)
    assert space.min_flops(inputs) < 10_000_000


def test_a_repeated_proposal_is_never_trained_twice(tmp_path):
    searcher = make(tmp_path)
    first = searcher.suggest("a")
    searcher.on_trial_complete("a", {"val_acc": 0.8, "epoch": 3})
    study = searcher.study
    study.enqueue_trial(study.trials[first["number"]].params)  # the sampler proposes the same point again
    second = searcher.suggest("b")
    assert second["number"] != first["number"] and searcher.repeats == 1
    repeat = next(t for t in study.trials if S.is_repeat(t))
    assert repeat.user_attrs["repeat_of"] == first["number"] and repeat.value == 0.8 and not S.trained(repeat)
    assert study.trials[second["number"]].params != study.trials[first["number"]].params
