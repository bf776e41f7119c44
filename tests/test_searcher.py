"""The searcher contract, without a Ray cluster: suggest, results, completion, pickling, resume."""

import pickle

import optuna
import pytest
from optuna.trial import TrialState

from tokennas.config import config_key
from tokennas.search.studies import study as S
from tokennas.search.tune.searcher import BudgetSearcher
from tokennas.spaces import Inputs, get_space

BUDGET = 30_000_000


def make(tmp_path, objective="acc", sampler="tpe", budget=BUDGET):
    study = S.open_study(tmp_path, objective, S.make_sampler(sampler, 0, 8), create=True)
    return BudgetSearcher(study, get_space("psvit"), Inputs(), budget, max_epochs=3, stall=20)


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
    assert searcher.study.trials[numbers["c"]].state == TrialState.RUNNING  # until Ray's callback has the text
    searcher.fail("c", "ValueError: boom")
    trials = {t.number: t for t in searcher.study.trials}
    a, b, c = (trials[numbers[i]] for i in ids)
    assert a.state == TrialState.COMPLETE and a.value == 0.7 and a.intermediate_values == {1: 0.5, 2: 0.6, 3: 0.7}
    assert b.state == TrialState.PRUNED and b.user_attrs["epochs"] == 1 and b.intermediate_values == {1: 0.4}
    assert c.state == TrialState.FAIL and c.user_attrs["error"] == "ValueError: boom" and S.is_failed(c)
    assert searcher.live == {} and len(searcher.failures()) == 1


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


@pytest.mark.slow  # about 40 s: 300 proposals
def test_sampler_learns_from_the_budget(tmp_path):
    """With the constraint told, TPE's later proposals are over budget less often than random ones."""
    counts = {}
    for sampler in ("tpe", "random"):
        (tmp_path / sampler).mkdir()
        searcher = make(tmp_path / sampler, sampler=sampler, budget=12_000_000)
        for i in range(16):
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


def test_a_repeated_config_is_never_trained_twice_and_is_told_the_originals_value(tmp_path):
    """Two parameter sets build one config: depth 4 pooled twice leaves stages of at most two blocks, where sharing
    every second block is sharing all but the first (psvit's remaining duplicate, see tests/test_encodings.py)."""
    searcher = make(tmp_path)
    study = searcher.study
    same = [{"embed_dim": 64, "num_heads": 2, "depth": 4, "pool_schedule": "two-stage", "pool_kind": "max2d",
             "attn_sharing": sharing} for sharing in ("alternate", "per-stage")]
    for params in same:
        study.enqueue_trial(params)
    first = searcher.suggest("a")
    searcher.on_trial_complete("a", {"val_acc": 0.8, "epoch": 3})
    second = searcher.suggest("b")
    assert searcher.repeats == 1 and second["config"] != first["config"]
    repeats = [t for t in study.trials if S.is_repeat(t)]
    assert [t.params["attn_sharing"] for t in repeats] == ["per-stage"]
    for t in repeats:  # the sampler learns the original's value again; the repeat is no trained candidate
        assert t.user_attrs["repeat_of"] == first["number"] and t.state == TrialState.COMPLETE and t.value == 0.8
        assert not S.trained(t) and "val_acc" not in t.user_attrs


def test_a_small_space_finishes_without_grinding(tmp_path):
    """stt under 1.99M has 6 distinct feasible configs: all 6 are handed out, then the searcher finishes."""
    from ray.tune.search import Searcher

    space, inputs = get_space("stt"), Inputs()
    feasible, _ = space.feasible(1_990_000, inputs)
    study = S.open_study(tmp_path, "acc", S.make_sampler("tpe", 0, 6), create=True)
    searcher = BudgetSearcher(study, space, inputs, 1_990_000, max_epochs=1, trials=6, feasible=feasible, stall=10)
    configs = []
    for i in range(6):
        configs.append(config_key(searcher.suggest(str(i))["config"]))
        searcher.on_trial_complete(str(i), {"val_acc": 0.5, "epoch": 1})
    assert sorted(configs) == sorted(feasible) and searcher.suggest("done") == Searcher.FINISHED
    assert len(study.trials) < 2_000


def test_failures_are_replaced_until_the_limit(tmp_path):
    from ray.tune.search import Searcher

    study = S.open_study(tmp_path, "acc", S.make_sampler("random", 0, 2), create=True)
    searcher = BudgetSearcher(study, get_space("psvit"), Inputs(), BUDGET, max_epochs=1, trials=2, max_failures=2,
                              stall=20)
    searcher.suggest("a")
    searcher.suggest("b")
    assert searcher.suggest("c") is None  # two in flight for two trials
    searcher.on_trial_complete("a", error=True)
    searcher.fail("a", "RuntimeError: out of memory")
    assert isinstance(searcher.suggest("c"), dict)  # the failure does not count: a replacement is proposed
    searcher.on_trial_complete("b", error=True)
    searcher.fail("b", "RuntimeError: out of memory")
    assert searcher.stopped_for_failures() and searcher.suggest("d") is None  # "c" still runs
    searcher.on_trial_complete("c", {"val_acc": 0.5, "epoch": 1})
    assert searcher.suggest("e") == Searcher.FINISHED


def test_tpe_models_only_after_feasible_startup(tmp_path):
    """Over-budget proposals do not count towards TPE's start-up: it models from trained candidates."""
    searcher = make(tmp_path, budget=12_000_000)
    sampler = searcher.study.sampler.sampler  # FeasibleStartup, inside SkipTried
    chosen = []
    original = sampler.before_trial

    def spy(study, trial):
        original(study, trial)
        feasible = sum(1 for t in study.get_trials(deepcopy=False) if S.trained(t) or (
            t.state == TrialState.RUNNING and "flops" in t.user_attrs and not S.is_infeasible(t)))
        chosen.append((sampler._active[trial.number] is sampler.model, feasible))

    sampler.before_trial = spy
    for i in range(5):
        searcher.suggest(str(i))
        searcher.on_trial_complete(str(i), {"val_acc": 0.5 + i / 100, "epoch": 3})
    assert searcher.infeasible > 0
    assert all(feasible >= sampler.n_startup for model, feasible in chosen if model)
    assert any(model for model, _ in chosen)


def test_pareto_rungs_stop_only_dominated_candidates():
    from ray.tune.schedulers import TrialScheduler

    from tokennas.search.tune.schedulers import ParetoRungs

    rungs = ParetoRungs(grace_period=1, max_t=3)
    assert rungs.rungs == [1]
    assert rungs.decide(1, 0.80, 20e6) == TrialScheduler.CONTINUE
    assert rungs.decide(1, 0.60, 5e6) == TrialScheduler.CONTINUE  # less accurate but cheaper: on the front
    assert rungs.decide(1, 0.50, 25e6) == TrialScheduler.STOP  # worse and dearer than the first
    assert rungs.decide(1, 0.85, 30e6) == TrialScheduler.CONTINUE


def test_first_rung_comes_after_the_warmup():
    from tokennas.search.tune.schedulers import first_rung

    assert first_rung(3, 1.0) == 2 and first_rung(3, 0.3) == 1 and first_rung(9, 2.5) == 3 and first_rung(1, 0.3) == 1
    assert first_rung(8, 0.3) == 2
