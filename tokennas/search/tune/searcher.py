"""Ray Tune searchers over the Optuna studies of a run.

``BudgetSearcher`` keeps the FLOPs budget hard: a proposal over budget is closed in Optuna as
infeasible inside ``suggest`` and the next one is asked, so Ray only ever starts feasible candidates
and the sampler still learns where the budget ends. Given a latency model (``tokennas.latency``), it predicts every
proposal's latency, and a latency budget is kept the same way. A proposal whose config was already trained is
closed as a repeat, told its original's outcome (``study.tell_repeat``), and never trained twice.
Reference jobs (the uniform baseline) are handed out before the sampler's candidates and recorded in
the runs study, outside the sampler's evidence.

The count of trained candidates is read from the study, so a failure is replaced by a new proposal
and the search ends when ``trials`` candidates are trained or ``max_failures`` trials have failed.
Several drivers may share one study (``coordination.py``): the count and the repeat check are then
taken on each trial's turn, over every driver's trials. They are read from a ``coordination.StudyIndex`` that
each proposal brings up to date with the trials added or finished since the last, not from a scan of the study.

``JobSearcher`` hands out a fixed list of runs (the re-ranking stage) and records them the same way.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.search import Searcher

from ...config import config_key
from ...spaces import Inputs, Space
from ..studies import adapter, coordination
from ..studies import study as S
from .cluster import record_placement


def error_line(error: BaseException | str | None) -> str:
    """The last line of an exception as a traceback prints it: ``ValueError: loss is nan at ...``."""
    if error is None:
        return "the trial raised an error"
    if isinstance(error, BaseException):
        cause = getattr(error, "cause", None) or error
        text = str(cause).strip()
        return f"{type(cause).__name__}: {text.splitlines()[-1] if text else ''}".strip()
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else "the trial raised an error"


class RunsSearcher(Searcher):
    """Hands out reference and re-ranking runs (``jobs``), each one trial of the runs study; the search stage's
    ``BudgetSearcher`` adds the sampler's candidates. ``max_failures`` counts every failed trial of the run, in
    both studies, so a failure is never counted twice against the limit."""

    def __init__(self, study: optuna.Study, jobs: list[dict[str, Any]] | None = None,
                 max_failures: int = 1_000_000, max_epochs: int = 0) -> None:
        super().__init__(metric="val_acc", mode="max")
        self.study, self.jobs, self.max_failures, self.max_epochs = study, list(jobs or []), max_failures, max_epochs
        self.runs = S.open_runs(study)
        self.live: dict[str, optuna.Trial] = {}
        self.history: dict[str, list[float]] = {}
        self.jobs_live: dict[str, tuple[optuna.Trial, list[float]]] = {}
        self.pending_errors: dict[str, tuple[str, optuna.Trial]] = {}  # failed, waiting for the error's text
        self.infeasible = self.repeats = self.fallbacks = 0
        self.others: list[int] = []  # runs of our jobs that another driver of a shared study holds

    def failures(self) -> list[optuna.trial.FrozenTrial]:
        return S.failures(self.study, self.runs)

    def stopped_for_failures(self) -> bool:
        return len(self.failures()) >= self.max_failures

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.jobs and not self.stopped_for_failures():
            job = self._start_job(trial_id)
            if job is not None:
                return job
        return self._finished()

    def __getstate__(self) -> dict[str, Any]:
        """Ray pickles its searcher with the experiment state: keep where the studies live, not their handles."""
        state = dict(self.__dict__)
        study = state.pop("study")
        state.pop("runs")
        state["_study_ref"] = (adapter.storage(study), study.study_name, study.sampler)
        state["live"] = {k: t.number for k, t in self.live.items()}
        state["jobs_live"] = {k: (t.number, h) for k, (t, h) in self.jobs_live.items()}
        state["pending_errors"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        storage, name, sampler = state.pop("_study_ref")
        self.__dict__.update(state)
        self.study = optuna.load_study(storage=storage, study_name=name, sampler=sampler)
        self.runs = S.open_runs(self.study)
        self.live = {k: adapter.handle(self.study, n) for k, n in state["live"].items()}
        self.jobs_live = {k: (adapter.handle(self.runs, n), h) for k, (n, h) in state["jobs_live"].items()}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))

    def _start_job(self, trial_id: str) -> dict[str, Any] | None:
        """The next job nobody has run: drivers sharing a study take each job once (the lowest trial wins)."""
        while self.jobs:
            job = self.jobs.pop(0)
            run = self.runs.ask()
            for key in ("role", "stage", "source", "seed", "config", "flops", "params", "epochs_planned", "init"):
                if key in job:
                    run.set_user_attr(key, job[key])
            holder = coordination.job_taken(self.runs, run)
            if holder is not None:  # another driver runs it: wait for it before finishing (whole reports)
                self.others.append(holder)
                continue
            self.jobs_live[trial_id] = (run, [])
            passed = ("init", "parent", "resume_from", "score_images")  # what some jobs' trainables need
            return {"config": job["config"], "flops": job["flops"], "number": f"{job['source']}/s{job['seed']}",
                    "role": job["role"], "seed": job["seed"], "epochs": job["epochs_planned"],
                    **{k: job[k] for k in passed if k in job}}
        return None

    def _result_job(self, trial_id: str, result: dict[str, Any]) -> None:
        run, history = self.jobs_live[trial_id]
        history.append(float(result["val_acc"]))
        run.set_user_attr("history", list(history))
        record_placement(run, result)

    def _finished(self) -> str | None:
        """FINISHED once nothing of ours runs and the runs other drivers took from us have ended."""
        if self.live or self.jobs_live:
            return None
        if self.others:
            coordination.fail_stale(self.runs)
            running = {t.number for t in self.runs.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
            self.others = [n for n in self.others if n in running]
            if self.others:
                time.sleep(0.5)
                return None
        return Searcher.FINISHED

    def held_trials(self) -> list[optuna.Trial]:
        """The trials this driver trains now (their heartbeats say it is alive)."""
        return [*self.live.values(), *(run for run, _ in self.jobs_live.values())]

    def _complete_job(self, trial_id: str, result: dict[str, Any] | None, error: bool) -> None:
        run, history = self.jobs_live.pop(trial_id)
        if result and "val_acc" in result and int(result["epoch"]) > len(history):
            history.append(float(result["val_acc"]))
            run.set_user_attr("history", list(history))
        if error:
            return  # closed by ``fail`` once the error's text is known
        planned = adapter.user_attrs(self.runs, run)["epochs_planned"]
        if not result or "val_acc" not in result or int(result["epoch"]) < planned:
            run.set_user_attr("interrupted", "stopped before its last epoch")
            self.runs.tell(run, state=TrialState.FAIL)
            return
        run.set_user_attr("val_acc", float(result["val_acc"]))
        run.set_user_attr("seconds", float(result.get("time_total_s", 0.0)))
        self.runs.tell(run, float(result["val_acc"]))

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if "val_acc" not in result or "error" in result or "epoch_progress" in result:  # progress only
            return
        if trial_id in self.jobs_live:
            self._result_job(trial_id, result)
        elif trial_id in self.live:
            S.report_epoch(self.study, self.live[trial_id], float(result["val_acc"]), int(result["epoch"]),
                           self.history[trial_id])
            record_placement(self.live[trial_id], result)  # the node it ran on

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if result and "error" in result:  # the trainable caught the candidate's own failure (see train_candidate)
            number = result.get("config", {}).get("number", trial_id)
            logging.getLogger("tokennas").warning("trial %s failed:\n%s", number,
                                                  result.get("traceback", result["error"]))
            self.on_trial_complete(trial_id, None, error=True)
            self.fail(trial_id, str(result["error"]))
            return
        if trial_id in self.jobs_live:
            if error:  # Ray calls this before its callbacks see the error: ``fail`` closes it with the text
                self.pending_errors[trial_id] = ("runs", self.jobs_live[trial_id][0])
            self._complete_job(trial_id, result, error)
            return
        if not error and result and "val_acc" in result and int(result["epoch"]) > len(self.history.get(trial_id, [])):
            self.on_trial_result(trial_id, result)  # Ray hands a trial's last result only to on_trial_complete
        trial = self.live.pop(trial_id, None)
        self.history.pop(trial_id, None)
        if trial is None:
            return
        if error:
            self.pending_errors[trial_id] = ("study", trial)
        else:
            S.tell_result(self.study, trial, result, self.max_epochs)

    def fail(self, trial_id: str, message: str) -> None:
        """Close a trial whose training raised, with the exception's last line."""
        where, trial = self.pending_errors.pop(trial_id, (None, None))
        if where == "study":
            S.tell_failed(self.study, trial, message)
        elif where == "runs":
            trial.set_user_attr("error", message)
            self.runs.tell(trial, state=TrialState.FAIL)

    def record_checkpoint(self, trial_id: str, path: str) -> None:
        if trial_id in self.live:
            self.live[trial_id].set_user_attr("checkpoint", path)
        elif trial_id in self.jobs_live:  # the supernet's run: its weights are read from the last checkpoint
            self.jobs_live[trial_id][0].set_user_attr("checkpoint", path)

    def close_pending(self, reason: str) -> None:
        """Trials Ray stopped without completing them (the time budget): interrupted, asked again on resume."""
        for trial_id in list(self.pending_errors):
            self.fail(trial_id, "the trial raised an error")
        for trial_id in list(self.live):
            trial, history = self.live.pop(trial_id), self.history.pop(trial_id, [])
            trial.set_user_attr("history", history)
            S.tell_interrupted(self.study, trial, f"{reason} after epoch {len(history)} of {self.max_epochs}")
        for trial_id in list(self.jobs_live):
            run, history = self.jobs_live.pop(trial_id)
            run.set_user_attr("interrupted", f"{reason} after epoch {len(history)}")
            self.runs.tell(run, state=TrialState.FAIL)


class BudgetSearcher(RunsSearcher):
    """Optuna proposes, the analytic FLOPs count filters, Ray trains what fits and is new. ``stall``: over-budget
    or repeated proposals in a row after which the sampler is handed an untried feasible candidate (the
    strategy's ``stall``: it depends on what scoring a candidate costs). ``latency``: a ``LatencyModel`` that
    predicts each proposal's latency (``latency_ms``); ``latency_budget_ms``: the most it may predict.
    ``keep_going``: asked between the misses of one proposal (the run's ``time_left``); once it says no, ``suggest``
    gives up the proposal (None), so a signal or the time budget is not held up by a sampler that keeps missing."""

    def __init__(self, study: optuna.Study, space: Space, inputs: Inputs, budget: int, max_epochs: int, *,
                 stall: int, trials: int = 1_000_000, max_failures: int = 1_000_000,
                 feasible: dict[str, dict] | None = None, jobs: list[dict[str, Any]] | None = None,
                 seed: int = 0, latency: Any = None, latency_budget_ms: float | None = None,
                 keep_going: Callable[[], bool] | None = None) -> None:
        super().__init__(study, jobs, max_failures, max_epochs)
        self.space, self.inputs, self.budget, self.trials = space, inputs, budget, trials
        if latency_budget_ms is not None and latency is None:
            raise ValueError("a latency budget needs a latency model to predict with")
        self.latency, self.latency_budget_ms = latency, latency_budget_ms
        # canonical config key -> parameters of every distinct feasible candidate, for when the sampler stalls
        self.feasible = feasible if feasible is not None else space.feasible(budget, inputs)[0]
        self.rng, self.stall = random.Random(seed), stall
        self._next_poll, self.keep_going = 0.0, keep_going
        self.index = coordination.StudyIndex(study)  # built on the first proposal (a resumed study too)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("index")
        state["keep_going"] = None  # the run's, not the searcher's: an unpickled one is not asked
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.index = coordination.StudyIndex(self.study)

    def stopped_for_failures(self) -> bool:
        self.index.refresh()
        return self.index.failed + len(S.run_failures(self.runs)) >= self.max_failures

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.stopped_for_failures():
            return self._finished()
        if self.jobs:
            job = self._start_job(trial_id)
            if job is not None:
                return job
        if time.monotonic() < self._next_poll:
            return None
        adapter.fail_stale(self.study)  # a dead driver's trials (shared RDB studies); the turn reads them
        trained, training = self.index.counts()  # over every driver of the study
        if trained >= self.trials:
            return self._finished()
        if trained + training >= self.trials:  # enough in flight; a failure among them will be replaced
            if training > len(self.live):  # other drivers' trials: poll the shared study once a second
                self._next_poll = time.monotonic() + 1.0
                if not (self.live or self.jobs_live):
                    time.sleep(0.5)  # nothing of ours runs: nothing here to keep responsive
            return None
        return self._propose(trial_id)

    def _tried(self, params: dict[str, Any]) -> bool | None:
        """Whether ``params`` (a sampler's relative sample) build a config already proposed; None when they are not a
        whole proposal of this space (a dimension with an effect left out) or do not build (``SkipTried`` then keeps
        the sample)."""
        try:
            full = self.space.completed(params, self.inputs)
            if full is None:
                return None
            config = self.space.build(full, self.inputs)
        except (ValueError, KeyError, TypeError):
            return None
        return config_key(config) in self.index.proposed()

    def _propose(self, trial_id: str) -> dict[str, Any] | None:
        sampler = self.study.sampler
        # in an enumerable space; a continuous one (layers) repeats by projection, and moves on by its fallback
        skip = isinstance(sampler, S.SkipTried) and getattr(self.space, "enumerable", True)
        if skip:
            sampler.check = self._tried
        try:
            return self._propose_one(trial_id)
        finally:
            if skip:
                sampler.check = None

    def _propose_one(self, trial_id: str) -> dict[str, Any] | None:
        from ...flops import count_flops

        misses = 0
        while True:
            if misses and self.keep_going is not None and not self.keep_going():
                return None  # stopped by a signal or the time budget while the sampler kept missing
            if misses and misses % self.stall == 0:
                self._enqueue_untried()
            trial = coordination.take_turn(self.index, self.study.ask(), self.trials)
            if trial is None:  # the other drivers filled the study first
                return None
            config = self.space.suggest(trial, self.inputs)
            flops = count_flops(config)
            latency_ms = None if self.latency is None else self.latency.predict(config) * 1e3
            if not S.record_cost(trial, config, flops, self.budget, latency_ms, self.latency_budget_ms):
                S.tell_infeasible(self.study, trial, flops, latency_ms)
                self.infeasible += 1
                misses += 1
                continue
            original = self.index.original(config_key(config), trial.number)
            if original is not None:  # samplers re-propose, and many parameter sets build one config
                S.tell_repeat(self.study, trial, original, self.index.liar())
                self.repeats += 1
                misses += 1
                continue
            if isinstance(self.study.sampler, S.SkipTried) and trial.number in self.study.sampler.moved:
                trial.set_user_attr("moved", True)  # the sampler's tried pick, replaced by an untried neighbour
            coordination.claim(self.study, trial)  # ends this trial's turn
            self.live[trial_id], self.history[trial_id] = trial, []
            suggestion = {"config": config.to_dict(), "flops": flops, "number": trial.number, "role": "candidate",
                          "epochs": self.max_epochs}
            resume = self._resume_from(trial)
            if resume:
                suggestion["resume_from"] = resume
            return suggestion

    def _enqueue_untried(self) -> None:
        """The sampler keeps proposing what is over budget or already scored: hand it one untried feasible candidate
        at random (an enumerable space), or a direction drawn uniformly from its distributions (a continuous one,
        such as ``layers``, where a converging TPE projects nearby directions onto one schedule), so a search near the
        end of a small space still finishes and a stalled one moves on. It is marked ``fallback`` (the summary counts
        them)."""
        if self.feasible:
            untried = sorted(set(self.feasible) - self.index.proposed())
            if not untried:
                return
            params = self.feasible[self.rng.choice(untried)]
        elif not getattr(self.space, "enumerable", True):
            uniform = optuna.samplers.RandomSampler(seed=self.rng.randrange(2**32))  # Optuna's draws, any distribution
            params = {name: uniform.sample_independent(self.study, None, name, d)
                      for name, d in self.space.distributions(self.inputs).items()}
        else:
            return
        self.study.enqueue_trial(params, user_attrs={"fallback": True})
        self.fallbacks += 1

    def _resume_from(self, trial: optuna.Trial) -> str | None:
        """The last checkpoint of the interrupted trial this one retries, if it is still there."""
        retry_of = adapter.user_attrs(self.study, trial).get("retry_of")
        if retry_of is None:
            return None
        path = self.index.trials[retry_of].user_attrs.get("checkpoint")
        return path if path and Path(path).exists() else None

class TrialEvents(Callback):
    """Hands the searcher what only Ray's callbacks see: a failed trial's error, a trial's checkpoint path."""

    def __init__(self, searcher: BudgetSearcher) -> None:
        self.searcher = searcher

    def __getstate__(self) -> dict[str, Any]:
        return {"searcher": None}  # Ray pickles callbacks with its experiment state

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.searcher is None:
            return
        error = None
        with contextlib.suppress(Exception):  # the error file may be unreadable; the trial still fails
            error = trial.get_pickled_error() or trial.get_error()
        if error is None and trial.local_path:  # Ray writes error.txt before this call, but its metadata may lag
            text = Path(trial.local_path, "error.txt")
            error = text.read_text() if text.is_file() else None
        self.searcher.fail(trial.trial_id, error_line(error))

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        if self.searcher is not None:
            self.searcher.record_checkpoint(trial.trial_id, checkpoint.path)
