"""Repeats that teach, and a study index that answers like a scan: the searcher contract without a Ray cluster."""

import json
import pickle
import random

import optuna
import pandas as pd
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState
from ray.tune.search import Searcher

from tokennas import count_flops
from tokennas.config import config_key
from tokennas.search.settings import SearchSettings, save_settings
from tokennas.search.stages import trained_count
from tokennas.search.studies import adapter
from tokennas.search.studies import coordination as C
from tokennas.search.studies import study as S
from tokennas.search.tune.searcher import BudgetSearcher
from tokennas.spaces import Inputs, get_space

BUDGET = 30_000_000


def make(objective="acc", sampler="tpe", trials=1_000_000, stall=20, seed=0):
    """A searcher over psvit under 30M MACs, on an in-memory study (SQLite's writes would take most of the time)."""
    study = S.open_study(optuna.storages.InMemoryStorage(), objective, S.make_sampler(sampler, seed, 8), create=True)
    return BudgetSearcher(study, get_space("psvit"), Inputs(), BUDGET, max_epochs=3, stall=stall, trials=trials,
                          feasible={}, seed=seed)


def propose_again(searcher, number, trial_id):
    """Enqueue trial ``number``'s parameters and ask: the repeat is closed inside ``suggest``, which then hands out
    the sampler's next candidate (returned)."""
    searcher.study.enqueue_trial(searcher.study.trials[number].params)
    before = searcher.repeats
    suggestion = searcher.suggest(trial_id)
    assert searcher.repeats == before + 1
    return suggestion


def repeat_of(study, number):
    (repeat,) = [t for t in study.trials if t.user_attrs.get("repeat_of") == number]
    return repeat


@pytest.mark.parametrize("objective", ["acc", "pareto"])
def test_a_repeat_of_a_complete_candidate_is_told_its_values(objective):
    searcher = make(objective, sampler="tpe" if objective == "acc" else "nsga2")
    first = searcher.suggest("a")
    searcher.on_trial_complete("a", {"val_acc": 0.7, "epoch": 3})
    propose_again(searcher, first["number"], "b")
    original, repeat = searcher.study.trials[first["number"]], repeat_of(searcher.study, first["number"])
    assert repeat.state == TrialState.COMPLETE and repeat.values == original.values
    assert original.values[0] == 0.7 and (objective == "acc" or original.values[1] == first["flops"])
    assert not S.trained(repeat) and trained_count(searcher.study) == 1


def test_a_repeat_of_a_pruned_candidate_mirrors_its_last_rung():
    searcher = make()
    first = searcher.suggest("a")
    searcher.on_trial_result("a", {"val_acc": 0.3, "epoch": 1})
    searcher.on_trial_complete("a", {"val_acc": 0.45, "epoch": 2})  # ASHA stopped it after 2 of 3 epochs
    propose_again(searcher, first["number"], "b")
    original, repeat = searcher.study.trials[first["number"]], repeat_of(searcher.study, first["number"])
    assert original.state == TrialState.PRUNED and original.intermediate_values == {1: 0.3, 2: 0.45}
    assert repeat.state == TrialState.PRUNED and repeat.intermediate_values == original.intermediate_values
    assert repeat.value == original.value == 0.45 and not S.trained(repeat)


@pytest.mark.parametrize("objective", ["acc", "pareto"])
def test_a_repeat_of_a_running_candidate_is_told_the_worst_completed_value(objective):
    searcher = make(objective, sampler="tpe" if objective == "acc" else "nsga2")
    for trial_id, acc in (("a", 0.6), ("b", 0.35), ("c", 0.5)):
        searcher.suggest(trial_id)
        searcher.on_trial_complete(trial_id, {"val_acc": acc, "epoch": 3})
    running = searcher.suggest("d")
    propose_again(searcher, running["number"], "e")
    repeat = repeat_of(searcher.study, running["number"])
    assert searcher.study.trials[running["number"]].state == TrialState.RUNNING
    assert repeat.state == TrialState.COMPLETE and repeat.values[0] == 0.35 == repeat.user_attrs["liar"]
    assert objective == "acc" or repeat.values[1] == running["flops"]
    searcher.on_trial_complete("d", {"val_acc": 0.9, "epoch": 3})
    assert trained_count(searcher.study) == 4  # the repeat is not one


def test_a_repeat_of_a_running_candidate_before_any_completed_is_told_zero():
    searcher = make()
    running = searcher.suggest("a")
    propose_again(searcher, running["number"], "b")
    repeat = repeat_of(searcher.study, running["number"])
    assert repeat.value == 0.0 and repeat.user_attrs["liar"] == 0.0


def test_a_repeat_of_a_failed_candidate_stays_fail_and_is_no_failure():
    searcher = make()
    first = searcher.suggest("a")
    searcher.on_trial_complete("a", None, error=True)
    searcher.fail("a", "RuntimeError: out of memory")
    propose_again(searcher, first["number"], "b")
    repeat = repeat_of(searcher.study, first["number"])
    assert repeat.state == TrialState.FAIL and not S.is_failed(repeat) and len(searcher.failures()) == 1


def test_an_interrupted_candidate_is_trained_again_not_repeated():
    searcher = make()
    first = searcher.suggest("a")
    searcher.close_pending("cut by --time-budget")
    searcher.study.enqueue_trial(searcher.study.trials[first["number"]].params)
    again = searcher.suggest("b")
    assert searcher.repeats == 0 and again["config"] == first["config"] and again["number"] != first["number"]


def test_repeats_never_count_as_trained():
    """Every candidate is proposed twice; the search still ends after --trials trained ones, all distinct."""
    searcher = make(trials=3)
    suggestion = searcher.suggest("t0")
    for i in range(1, 4):
        searcher.on_trial_complete(f"t{i - 1}", {"val_acc": 0.5 + i / 10, "epoch": 3})
        searcher.study.enqueue_trial(searcher.study.trials[suggestion["number"]].params)
        suggestion = searcher.suggest(f"t{i}")
    assert suggestion == Searcher.FINISHED and searcher.repeats >= 2
    assert trained_count(searcher.study) == 3 and C.counts(searcher.study) == (3, 0)
    trained = [t for t in searcher.study.trials if S.trained(t)]
    assert len({config_key(t.user_attrs["config"]) for t in trained}) == 3


def _old_tell_repeat(study, trial, original, liar):
    """The behaviour before issue 21: a repeat is FAIL, which no sampler reads."""
    trial.set_user_attr("repeat_of", original.number)
    study.tell(trial, state=TrialState.FAIL)


def test_told_repeats_stop_tpe_proposing_the_same_vector(monkeypatch):
    """TPE, 30 trained psvit candidates under 30M MACs, seed 0, no fallback: with repeats told FAIL its model never
    changes, so it proposes the same parameters again and again; told the original's value, far fewer repeats."""
    def repeats(told: bool) -> tuple[int, int]:
        with monkeypatch.context() as patch:
            if not told:
                patch.setattr(S, "tell_repeat", _old_tell_repeat)
            searcher = make(trials=30, stall=10**9)
            for i in range(30):
                suggestion = searcher.suggest(str(i))
                searcher.on_trial_complete(str(i), {"val_acc": (suggestion["flops"] / BUDGET) ** 2, "epoch": 3})
        closed = [t for t in searcher.study.trials if S.is_repeat(t)]
        same = sum(a.params == b.params for a, b in zip(closed, closed[1:], strict=False))  # the very same vector
        return searcher.repeats, same

    (failed, failed_same), (told, told_same) = repeats(False), repeats(True)
    assert told * 3 < failed and told_same * 2 < failed_same


def test_the_summary_counts_repeats_and_fallbacks_and_ranks_neither(tmp_path):
    """stt under 1.99M MACs has 6 distinct feasible configs: TPE repeats itself and the fallback hands out the rest;
    the report, rebuilt from the stored study as `tokennas report` does, says how many of each."""
    from tokennas.report import write_reports

    space, inputs = get_space("stt"), Inputs()
    feasible, _ = space.feasible(1_990_000, inputs)
    study = S.open_study(tmp_path, "acc", S.make_sampler("tpe", 0, 6), create=True)
    searcher = BudgetSearcher(study, space, inputs, 1_990_000, max_epochs=1, trials=6, feasible=feasible, stall=4)
    for i in range(6):
        searcher.suggest(str(i))
        searcher.on_trial_complete(str(i), {"val_acc": 0.5 + i / 100, "epoch": 1})
    assert searcher.suggest("done") == Searcher.FINISHED
    assert searcher.repeats > 0 and searcher.fallbacks > 0, "the fixture no longer repeats or falls back"
    save_settings(SearchSettings(space="stt", flops="1.99M", trials=6, epochs=1, retrain_top=0),
                  tmp_path / "search.yaml")
    write_reports(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert f"{searcher.repeats} repeated configs" in summary
    assert f"{searcher.fallbacks} candidates drawn at random when the sampler stalled" in summary
    trials = pd.read_csv(tmp_path / "trials.csv")
    assert (trials["state"] == "REPEAT").sum() == searcher.repeats and trials["fallback"].sum() == searcher.fallbacks
    assert len(pd.read_csv(tmp_path / "ranking.csv")) == 6


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_stalled_sampler_in_a_continuous_space_is_handed_a_random_direction():
    """layers enumerates nothing: a sampler that keeps proposing one schedule is handed a uniform direction after
    ``stall`` misses in a row, marked fallback, and the search moves on to new schedules."""
    from tokennas.spaces.layers import LayersSpace

    trunk = {"img_size": 16, "in_chans": 1, "num_classes": 10, "patch_size": 2, "embed_dim": 32, "depth": 4,
             "num_heads": 1}
    space, inputs = LayersSpace(trunk=trunk), Inputs(16, 1, 10)
    budget = count_flops(space.parent()) // 2
    space = LayersSpace(trunk=trunk, budget=budget)
    same = {name: 0.5 if name.startswith(("prune", "merge")) else False for name in space.dimensions(inputs)}
    sampler = optuna.samplers.PartialFixedSampler(same, optuna.samplers.RandomSampler(seed=0))  # always `same`
    study = S.open_study(optuna.storages.InMemoryStorage(), "acc", sampler, create=True)
    searcher = BudgetSearcher(study, space, inputs, budget, max_epochs=0, stall=4, trials=3, feasible={}, seed=0)
    configs = []
    for i in range(3):
        suggestion = searcher.suggest(str(i))
        configs.append(json.dumps(suggestion["config"], sort_keys=True))
        searcher.on_trial_complete(str(i), {"val_acc": 0.5, "epoch": 0})
    assert len(set(configs)) == 3 and searcher.fallbacks == 2 and searcher.repeats == 8
    fallbacks = [t for t in study.trials if t.user_attrs.get("fallback")]
    assert len(fallbacks) == 2 and all(t.params != same for t in fallbacks)
    assert all(count_flops(space.build(t.params, inputs)) <= budget for t in fallbacks)


# -- the index against full scans --
def _configs():
    space, inputs = get_space("psvit"), Inputs()
    grid = random.Random(0).sample(list(space.grid(inputs)), 6)
    return [space.build(p, inputs).to_dict() for p in grid]


def _scan(study):
    """What the index answers, by scanning every trial."""
    trials = study.get_trials(deepcopy=False)
    trained = [t for t in trials if S.trained(t) and t.state == TrialState.COMPLETE]
    return {"counts": C.counts(study), "failed": sum(S.is_failed(t) for t in trials),
            "worst": min((t.values[0] for t in trained), default=None),
            "proposed": {config_key(t.user_attrs["config"]) for t in trials
                         if "config" in t.user_attrs and not S.is_infeasible(t)}}


def _answers(index):
    return {"counts": index.counts(), "failed": index.failed, "worst": index.worst, "proposed": index.proposed()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_index_answers_as_a_full_scan(tmp_path, seed):
    """Two drivers (two storage handles on one journal) ask, decide and finish trials at random; at every step
    the first driver's incremental index agrees with find_repeat and counts, and with an index rebuilt from
    scratch (as after --resume)."""
    rng, configs, path = random.Random(seed), _configs(), str(tmp_path / "study.log")
    optuna.create_study(study_name="shared", storage=JournalStorage(JournalFileBackend(path)))
    drivers = [optuna.load_study(study_name="shared", storage=JournalStorage(JournalFileBackend(path)))
               for _ in range(2)]
    index = C.StudyIndex(drivers[0])
    training: list[tuple[optuna.Study, optuna.Trial]] = []
    for step in range(150):
        study = rng.choice(drivers)
        if training and rng.random() < 0.4:  # a training candidate ends
            owner, trial = training.pop(rng.randrange(len(training)))
            fate = rng.choice(["complete", "pruned", "error", "interrupted", "lost"])
            if fate == "complete":
                owner.tell(trial, rng.random())
            elif fate == "pruned":
                trial.report(rng.random(), 1)
                owner.tell(trial, state=TrialState.PRUNED)
            elif fate == "error":
                S.tell_failed(owner, trial, "RuntimeError: boom")
            elif fate == "interrupted":
                S.tell_interrupted(owner, trial, "cut by --time-budget")
            else:  # its driver died: the heartbeat fails it without a reason
                owner.tell(trial, state=TrialState.FAIL)
            continue
        trial = study.ask()
        if rng.random() < 0.1:
            study.enqueue_trial({}, user_attrs={"fallback": True})  # WAITING until the next ask
        trial.set_user_attr("config", rng.choice(configs))
        index.refresh()
        expected = S.find_repeat(study, trial)
        found = index.original(config_key(adapter.user_attrs(study, trial)["config"]), trial.number)
        assert (found and found.number) == (expected and expected.number), step
        assert _answers(index) == _scan(drivers[1]), step
        fresh = C.StudyIndex(drivers[1])
        fresh.refresh()
        assert _answers(fresh) == _answers(index), step
        lost, again = index.lost_candidate(), fresh.lost_candidate()
        assert (lost and lost.number) == (again and again.number), step
        fate = rng.choice(["infeasible", "repeat", "withdrawn", "train", "train"])
        if fate == "infeasible":
            trial.set_constraint("flops", 1.0)
            S.tell_infeasible(study, trial, BUDGET * 2)
        elif fate == "repeat" and expected is not None:
            trial.set_constraint("flops", -1.0)
            S.tell_repeat(study, trial, expected, index.liar())
        elif fate == "withdrawn":
            trial.set_user_attr(C.WITHDRAWN, True)
            study.tell(trial, state=TrialState.FAIL)
        else:
            trial.set_constraint("flops", -1.0)
            C.claim(study, trial)
            training.append((study, trial))
    assert index.trained > 0 and index.lost and index.failed > 0  # the walk visited every kind of trial


def test_tpe_moves_a_tried_pick_to_the_nearest_untried_candidate(monkeypatch):
    """The tokens space (one candidate index, by MACs) under 15M MACs, 60 candidates, an accuracy that rises with the
    MACs: TPE converges on the top of the order and re-picks scored indices. SkipTried hands the nearest untried
    index instead, so no proposal is a repeat; without it (the check never set) the same search repeats."""
    space, inputs = get_space("tokens"), Inputs()
    budget = 15_000_000

    def run(skip: bool) -> BudgetSearcher:
        study = S.open_study(optuna.storages.InMemoryStorage(), "acc", S.make_sampler("tpe", 0, 60), create=True)
        searcher = BudgetSearcher(study, space, inputs, budget, max_epochs=1, trials=60, feasible={}, stall=10**9)
        if not skip:
            monkeypatch.setattr(searcher, "_tried", lambda params: None)
        for i in range(60):
            suggestion = searcher.suggest(str(i))
            searcher.on_trial_complete(str(i), {"val_acc": suggestion["flops"] / budget, "epoch": 1})
        return searcher

    plain, skipping = run(False), run(True)
    assert plain.repeats >= 5, "the fixture no longer repeats without SkipTried"
    assert skipping.repeats == 0
    moved = [t for t in skipping.study.trials if t.user_attrs.get("moved")]
    assert moved and not any(t.user_attrs.get("moved") for t in plain.study.trials)
    keys = [config_key(t.user_attrs["config"]) for t in skipping.study.trials if S.trained(t)]
    assert len(keys) == len(set(keys)) == 60  # every scored candidate a distinct config
    order = space.dimensions(inputs)["candidate"]
    assert all(t.params["candidate"] in order for t in moved)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # PartialFixedSampler
def test_a_stop_is_not_held_up_by_a_sampler_that_keeps_repeating():
    """A sampler that proposes one config forever, no fallback: without ``keep_going`` the second proposal would
    never return. Once the run says stop (a signal, the time budget) ``suggest`` gives up with None, each repeat told
    before it."""
    space, inputs = get_space("psvit"), Inputs()
    params = next(p for p in space.grid(inputs) if count_flops(space.build(p, inputs)) <= BUDGET)
    sampler = optuna.samplers.PartialFixedSampler(params, optuna.samplers.RandomSampler(seed=0))
    study = S.open_study(optuna.storages.InMemoryStorage(), "acc", sampler, create=True)
    asked = []
    searcher = BudgetSearcher(study, space, inputs, BUDGET, max_epochs=1, stall=10**9, trials=10, feasible={},
                              keep_going=lambda: asked.append(1) or len(asked) < 5)
    first = searcher.suggest("0")
    assert first is not None and first != Searcher.FINISHED
    searcher.on_trial_complete("0", {"val_acc": 0.5, "epoch": 1})
    assert searcher.suggest("1") is None
    assert len(asked) == 5 and searcher.repeats == 5
    assert all(t.state != TrialState.RUNNING for t in study.trials)  # every repeat was told, none left open
    assert pickle.loads(pickle.dumps(searcher)).keep_going is None  # the run's callback stays with the run
