"""The Optuna side: samplers, the studies in the run folder, and the one adapter for constraints.

Infeasible candidates are told to the study as finished trials with the worst objective values and
a positive ``flops`` (or ``latency``) constraint (Optuna 5's ``trial.set_constraint``), which TPE, NSGA-II and
``best_trials`` read. They are never trained. Only this module touches Optuna's constraint API.

A Pareto study minimises one cost beside maximising accuracy: the MACs (``--objective pareto``) or the predicted
latency (``pareto-latency``, ``tokennas.latency``); every proposal carries both as user attributes (``flops``,
``latency_ms``), and the study records which one is its second objective (``pareto_cost``).

A run keeps two studies in one storage: ``tokennas`` (or ``--study-name``) holds the sampler's proposals;
``tokennas-runs`` (``NAME-runs``) holds the reference and re-ranking runs (the uniform baseline, and the
top candidates retrained with several seeds), which are not the sampler's evidence. Both are the
ground truth for ``--resume``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

import optuna
from optuna.trial import FrozenTrial, TrialState

from ...config import ModelConfig, config_key
from . import adapter

OBJECTIVES = ("acc", "pareto", "pareto-latency")
PARETO_COSTS = {"pareto": "flops", "pareto-latency": "latency_ms"}  # the user attribute each Pareto objective minimises
SAMPLERS = ("tpe", "nsga2", "random", "cmaes")
STUDY_NAME = "tokennas"
RUNS_STUDY = "tokennas-runs"
# what identifies a reference or re-ranking run in the runs study: runs of another length are other jobs
JOB_KEY = ("stage", "source", "seed", "epochs_planned")


def job_key(attrs: dict[str, Any]) -> tuple:
    return tuple(attrs.get(k) for k in JOB_KEY)


class FeasibleStartup(optuna.samplers.BaseSampler):
    """Random proposals until ``n_startup`` feasible candidates exist, then the model-based sampler.

    Optuna's own ``n_startup_trials`` counts every finished trial, over-budget proposals included, so
    TPE could start modelling before it saw a single trained candidate.
    """

    def __init__(self, model: optuna.samplers.BaseSampler, n_startup: int, seed: int) -> None:
        self.model, self.startup, self.n_startup = model, optuna.samplers.RandomSampler(seed=seed), n_startup
        self._active: dict[int, optuna.samplers.BaseSampler] = {}
        self.modelling = False  # n_startup feasible candidates finished: for good, so the study is not read again

    def _for(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        return self._active.get(trial.number, self.model)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        feasible = 0
        if not self.modelling:  # repeats are told their original's outcome, but they are not new candidates
            found = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                          TrialState.RUNNING))
                     if t.number != trial.number and t.constraints and not is_infeasible(t) and not is_repeat(t)]
            feasible = len(found)
            self.modelling = sum(t.state != TrialState.RUNNING for t in found) >= self.n_startup
        self._active[trial.number] = self.model if self.modelling or feasible >= self.n_startup else self.startup
        self._for(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._for(trial).after_trial(study, trial, state, values)
        self._active.pop(trial.number, None)

    def reseed_rng(self) -> None:
        self.model.reseed_rng()
        self.startup.reseed_rng()


class SkipTried(optuna.samplers.BaseSampler):
    """``sampler`` that does not hand back a config already proposed, where it can tell.

    While the searcher proposes, it sets ``check``: params -> whether they build a config already proposed (None
    when it cannot tell, e.g. a partial set). A relative sample (TPE's multivariate one) that ``check`` calls tried
    is replaced: in a space of one ordered integer (the ``tokens`` space's candidate index, by MACs) by the nearest
    untried value (ties at random), so the sampler's choice of neighbourhood stands and no proposal is wasted on a
    repeat; otherwise the sampler draws again, up to ``RETRIES`` times, and a last tried draw stays a repeat (told
    its original's value). ``moved``: the trial numbers whose sample was replaced."""

    RETRIES = 8

    def __init__(self, sampler: optuna.samplers.BaseSampler, seed: int) -> None:
        import random

        self.sampler, self.rng = sampler, random.Random(seed)
        self.check: Any = None
        self.moved: set[int] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "check": None}  # the searcher's callback is set again by the next proposal

    def before_trial(self, study, trial) -> None:
        self.sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        params = self.sampler.sample_relative(study, trial, search_space)
        if self.check is None or not params or self.check(params) is not True:
            return params
        (name, dist), = search_space.items() if len(search_space) == 1 else ((None, None),)
        if name in params and isinstance(dist, optuna.distributions.IntDistribution):
            value = self._nearest_untried(params, name, dist)
            if value is not None:
                self.moved.add(trial.number)
                return {**params, name: value}
            return params
        for _ in range(self.RETRIES):
            again = self.sampler.sample_relative(study, trial, search_space)
            if self.check(again) is False:
                self.moved.add(trial.number)
                return again
        return params

    def _nearest_untried(self, params: dict[str, Any], name: str, dist) -> int | None:
        value = params[name]
        for distance in range(dist.step, dist.high - dist.low + 1, dist.step):
            sides = [value - distance, value + distance]
            self.rng.shuffle(sides)
            for v in sides:
                if dist.low <= v <= dist.high and self.check({**params, name: v}) is False:
                    return v
        return None

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


def make_sampler(name: str, seed: int, trials: int, **tpe: Any) -> optuna.samplers.BaseSampler:
    """A seeded sampler; TPE and NSGA-II learn from the ``flops`` constraint. TPE's start-up proposals are
    random until a third of ``trials`` (2 to 10) feasible candidates exist, and its proposals skip configs already
    tried where the searcher can tell (``SkipTried``). ``tpe``: further ``TPESampler`` arguments (the replays'
    screens of its settings, benchmarks/bench_validity.py)."""
    if tpe and name != "tpe":
        raise ValueError(f"TPESampler arguments {sorted(tpe)} given for the {name!r} sampler")
    if name == "tpe":
        model = optuna.samplers.TPESampler(**{"seed": seed, "multivariate": True, "constant_liar": True,
                                              "n_startup_trials": 0, **tpe})
        return SkipTried(FeasibleStartup(model, max(2, min(10, trials // 3)), seed), seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, trials // 2)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":  # continuous parameters only (the layers space's rates); the others are drawn at random
        # CMA-ES ignores constraints; the layers space projects every proposal onto the budget, so none is over
        warnings.filterwarnings("ignore", message="Constraints have been set, but CmaEsSampler", category=UserWarning)
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=max(2, min(10, trials // 10)),
                                            warn_independent_sampling=False)
    raise ValueError(f"invalid --sampler {name!r}; expected one of: {', '.join(SAMPLERS)}")


class RunStorage(optuna.storages.RDBStorage):
    """Optuna's ``RDBStorage`` on a run folder's ``study.db``, with SQLite in write-ahead-log mode and
    ``synchronous=NORMAL``. Optuna commits once per asked parameter (about 33 commits for a ``layers`` proposal);
    with the default rollback journal each commit is an fsync (20 ms on this project's machines, against 0.04 ms in
    WAL mode: benchmarks/RESULTS.md, `make search`). In WAL mode a process that crashes or is killed loses nothing it
    committed; a power cut may lose the last commits, never the file (SQLite's documented guarantee). The log lives
    beside the file (``study.db-wal``, ``study.db-shm``) while a process has the study open. WAL needs a local
    file system: a study shared over a network folder belongs in ``--storage postgresql://...``."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._pragmas()

    def __setstate__(self, state: dict[Any, Any]) -> None:  # Ray unpickles the searcher's storage in its workers
        super().__setstate__(state)
        self._pragmas()

    def _pragmas(self) -> None:
        import sqlalchemy

        sqlalchemy.event.listen(self.engine, "connect", _wal)
        self.engine.dispose()  # the connection Optuna opened to create its tables is reopened with the pragmas


def _wal(connection: Any, record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def close(study: optuna.Study) -> None:
    """Close a run study's SQLite connections (its write-ahead log is folded into ``study.db`` and removed), before
    its folder is renamed."""
    backend = adapter.backend(study)
    if isinstance(backend, RunStorage):
        backend.engine.dispose()


def storage_url(run_dir: Path) -> str:
    """The SQLite URL of ``run_dir/study.db``; the path is percent-encoded, so that a folder named ``a?b`` or
    ``a%41b`` stays a folder name (SQLAlchemy decodes it) instead of becoming a URL query or escape."""
    return "sqlite:///" + quote(str((run_dir / "study.db").resolve()))


def open_study(where: Path | str | optuna.storages.BaseStorage, objective: str,
               sampler: optuna.samplers.BaseSampler | None = None, create: bool = False,
               study_name: str = STUDY_NAME) -> optuna.Study:
    """The study persisted in ``run_dir/study.db`` (``optuna-dashboard sqlite:///RUN_DIR/study.db``), or in
    the storage (URL or object, see ``storage.py``) given instead of a run folder. ``create`` joins a study
    of that name if another driver created it first."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["maximize"] if objective == "acc" else ["maximize", "minimize"]
    if isinstance(where, Path):
        where = storage_url(where)
    storage = RunStorage(where) if isinstance(where, str) and where.startswith("sqlite:///") else where
    if create:
        study = optuna.create_study(storage=storage, study_name=study_name, sampler=sampler, directions=directions,
                                    load_if_exists=True)
        if objective in PARETO_COSTS and study.user_attrs.get("pareto_cost") != PARETO_COSTS[objective]:
            study.set_user_attr("pareto_cost", PARETO_COSTS[objective])
        return study
    try:
        return optuna.load_study(storage=storage, study_name=study_name, sampler=sampler)
    except KeyError:
        raise ValueError(f"no study named {study_name!r} in its storage") from None


def open_runs(study: optuna.Study) -> optuna.Study:
    """The reference and re-ranking runs beside ``study``, in the same storage (created on first use)."""
    name = RUNS_STUDY if study.study_name == STUDY_NAME else f"{study.study_name}-runs"
    return optuna.create_study(storage=adapter.storage(study), study_name=name, direction="maximize",
                               load_if_exists=True)


def pareto_cost(study: optuna.Study) -> str:
    """The user attribute a two-objective study minimises: ``flops``, or ``latency_ms`` (``pareto-latency``)."""
    return study.user_attrs.get("pareto_cost", "flops")  # studies from before latency objectives: flops


def record_cost(trial: optuna.Trial, config: ModelConfig, flops: int, budget: int, latency_ms: float | None = None,
                latency_budget_ms: float | None = None) -> bool:
    """Store the candidate's costs and config on the trial; tell Optuna the constraints (MACs, and the predicted
    latency when it has a budget). True if feasible."""
    trial.set_user_attr("flops", flops)
    trial.set_user_attr("params", config.num_params())
    trial.set_user_attr("config", config.to_dict())
    trial.set_constraint("flops", float(flops - budget))
    feasible = flops <= budget
    if latency_ms is not None:
        trial.set_user_attr("latency_ms", latency_ms)
    if latency_budget_ms is not None:
        trial.set_constraint("latency", float(latency_ms - latency_budget_ms))
        feasible = feasible and latency_ms <= latency_budget_ms
    return feasible


def tell_infeasible(study: optuna.Study, trial: optuna.Trial, flops: int, latency_ms: float | None = None) -> None:
    """Close an over-budget proposal without training it: worst accuracy, its cost (FLOPs, or its predicted latency
    in a ``pareto-latency`` study), constraint > 0."""
    trial.set_user_attr("infeasible", True)
    if len(study.directions) == 1:
        study.tell(trial, 0.0)
    else:
        study.tell(trial, [0.0, float(latency_ms if pareto_cost(study) == "latency_ms" else flops)])


def holds_config(trial: FrozenTrial) -> bool:
    """A candidate that a later proposal of the same config repeats: trained, being trained, or failed with an
    error; a candidate that was only interrupted may be trained again."""
    if is_repeat(trial) or is_infeasible(trial) or "config" not in trial.user_attrs:
        return False
    if trial.state == TrialState.FAIL:
        return "error" in trial.user_attrs
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def find_repeat(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial | None:
    """The earliest candidate with the same config as ``trial`` (whatever parameters built it) that
    ``holds_config``, by a scan of the study; the searcher asks ``coordination.StudyIndex`` the same question."""
    key = config_key(adapter.user_attrs(study, trial)["config"])
    for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                                                          TrialState.FAIL)):
        if other.number != trial.number and holds_config(other) and config_key(other.user_attrs["config"]) == key:
            return other
    return None


def tell_repeat(study: optuna.Study, trial: optuna.Trial, original: FrozenTrial, liar: float) -> None:
    """Close a repeated proposal without training it, told what its original taught, so that the sampler learns
    instead of proposing the same parameters again (it ignores FAIL):

    - original COMPLETE: the original's value(s);
    - original PRUNED: its intermediate values, then PRUNED (Optuna takes the last as its value), the same rung;
    - original still RUNNING: ``liar``, a pessimistic accuracy (the caller's: the worst completed candidate's), as
      a constant liar does, recorded as the ``liar`` user attribute; a finished trial cannot be told again, so the
      lie stays after the original completes;
    - original FAILED with an error: FAIL, which teaches nothing (the error may be the machine's, not the config's).

    It keeps ``repeat_of``: the report shows it as REPEAT, and it never counts as a trained candidate."""
    trial.set_user_attr("repeat_of", original.number)
    if original.state == TrialState.COMPLETE:
        study.tell(trial, original.values)
    elif original.state == TrialState.PRUNED:
        for step, value in sorted(original.intermediate_values.items()):  # none in Pareto mode (not reported)
            trial.report(value, step)
        study.tell(trial, state=TrialState.PRUNED)
    elif original.state == TrialState.RUNNING:
        trial.set_user_attr("liar", liar)
        study.tell(trial, liar if len(study.directions) == 1 else [liar,
                                                                   float(original.user_attrs[pareto_cost(study)])])
    else:
        study.tell(trial, state=TrialState.FAIL)


def tell_failed(study: optuna.Study, trial: optuna.Trial, error: str) -> None:
    """A candidate whose training raised or diverged: FAIL, with the reason."""
    trial.set_user_attr("error", error)
    study.tell(trial, state=TrialState.FAIL)


def tell_interrupted(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """A candidate cut off before its last epoch (deadline, killed driver): FAIL without an error, so
    ``resume_interrupted`` asks for it again."""
    trial.set_user_attr("interrupted", reason)
    study.tell(trial, state=TrialState.FAIL)


def is_repeat(trial: FrozenTrial) -> bool:
    return "repeat_of" in trial.user_attrs


def is_infeasible(trial: FrozenTrial) -> bool:
    return any(v > 0 for v in (trial.constraints or {}).values()) or bool(trial.user_attrs.get("infeasible"))


def is_failed(trial: FrozenTrial) -> bool:
    """Training raised or diverged (not a repeat, not an interruption)."""
    return trial.state == TrialState.FAIL and "error" in trial.user_attrs


def failures(study: optuna.Study, runs: optuna.Study) -> list[FrozenTrial]:
    """Trials whose training raised or diverged, in the search and in the reference/re-ranking runs."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if is_failed(t)] + run_failures(runs)


def run_failures(runs: optuna.Study) -> list[FrozenTrial]:
    """Reference and re-ranking runs whose training raised or diverged (a few dozen runs at most)."""
    return [t for t in runs.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if "error" in t.user_attrs]


def trained(trial: FrozenTrial) -> bool:
    """A feasible candidate that finished training or was stopped early by the scheduler."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and not is_infeasible(trial) \
        and not is_repeat(trial)


def tell_result(study: optuna.Study, trial: optuna.Trial, result: dict[str, Any] | None, max_epochs: int) -> None:
    """Close a trained trial: COMPLETE after all epochs, PRUNED if the scheduler stopped it."""
    if not result or "val_acc" not in result:
        tell_failed(study, trial, "the trial ended without reporting a result")
        return
    acc, epochs = float(result["val_acc"]), int(result["epoch"])
    trial.set_user_attr("val_acc", acc)
    trial.set_user_attr("epochs", epochs)
    trial.set_user_attr("seconds", float(result.get("time_total_s", 0.0)))
    if epochs < max_epochs:
        study.tell(trial, state=TrialState.PRUNED)
    elif len(study.directions) == 1:
        study.tell(trial, acc)
    else:
        study.tell(trial, [acc, float(trial.user_attrs[pareto_cost(study)])])


def report_epoch(study: optuna.Study, trial: optuna.Trial, acc: float, epoch: int, history: list[float]) -> None:
    """Intermediate accuracy: Optuna's ``report`` in single-objective mode, a user attribute in both."""
    history.append(acc)
    trial.set_user_attr("history", list(history))
    if len(study.directions) == 1:
        trial.report(acc, epoch)


def resume_interrupted(study: optuna.Study, fail_running: bool = True, enqueue: bool = True) -> int:
    """Trials left RUNNING by a killed search (``fail_running``: no other driver can be running them), or
    cut off by a deadline, are asked again (once each, ``enqueue``)."""
    stale = [t for t in study.trials if t.state == TrialState.RUNNING] if fail_running else []
    for t in stale:
        adapter.set_user_attr(study, t, "interrupted", "the search was killed")
        study.tell(t.number, state=TrialState.FAIL)
    if not enqueue:
        return 0
    retried = {t.user_attrs.get("retry_of") for t in study.trials}
    again = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
             if "interrupted" in t.user_attrs and not is_infeasible(t) and not is_repeat(t) and t.number not in retried]
    for t in again:
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return len(again)
