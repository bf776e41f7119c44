"""A Ray Tune searcher over an Optuna study that keeps the FLOPs budget hard.

Ray's own ``OptunaSearch`` tells the study only the final objective, drops intermediate results in
multi-objective mode, and asks Ray to start every proposal. Here a proposal over budget is closed
in Optuna as infeasible inside ``suggest`` and the next one is asked, so Ray only ever starts
feasible candidates and the sampler still learns where the budget ends.
"""

from __future__ import annotations

import pickle
import time
from typing import Any

import optuna
from ray.tune.search import Searcher

from ..spaces import Inputs, Space
from . import coordination
from . import study as S
from .cluster import record_placement


class BudgetSearcher(Searcher):
    """Optuna proposes, the analytic FLOPs count filters, Ray trains what fits."""

    def __init__(self, study: optuna.Study, space: Space, inputs: Inputs, budget: int, max_epochs: int,
                 max_proposals: int = 20_000, target: int | None = None) -> None:
        super().__init__(metric="val_acc", mode="max")
        self.study, self.space, self.inputs, self.budget = study, space, inputs, budget
        self.max_epochs, self.max_proposals = max_epochs, max_proposals
        self.target = target  # issue 11: candidates the whole study trains, over every driver (None: no limit)
        self._next_poll = 0.0
        self.live: dict[str, optuna.Trial] = {}
        self.history: dict[str, list[float]] = {}
        self.infeasible = 0
        self.repeats = 0

    def __getstate__(self) -> dict[str, Any]:
        """Ray pickles its searcher with the experiment state: keep where the study lives, not its handle."""
        state = dict(self.__dict__)
        study = state.pop("study")
        state["_study_ref"] = (study._storage, study.study_name, study.sampler)
        state["live"] = {k: t.number for k, t in self.live.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        storage, name, sampler = state.pop("_study_ref")
        self.__dict__.update(state)
        self.study = optuna.load_study(storage=storage, study_name=name, sampler=sampler)
        self.live = {k: optuna.Trial(self.study, self.study._storage.get_trial_id_from_study_id_trial_number(
            self.study._study_id, n)) for k, n in state["live"].items()}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        from ..flops import count_flops

        if self.target is not None:  # issue 11: the study, not this driver, says when the search is done
            if time.monotonic() < self._next_poll:
                return None
            verdict = coordination.status(self.study, self.target)
            if verdict != "ask":
                self._next_poll = time.monotonic() + 1.0
                if verdict == "finished":
                    return Searcher.FINISHED
                if not self.live:
                    time.sleep(0.5)  # only others' trials are running: nothing here to keep responsive
                return None
        for _ in range(self.max_proposals):
            trial = coordination.take_turn(self.study, self.study.ask(), self.target)  # issue 11
            if trial is None:  # the other drivers filled the study first
                return None
            config = self.space.suggest(trial, self.inputs)
            flops = count_flops(config)
            if not S.record_cost(trial, config, flops, self.budget):
                S.tell_infeasible(self.study, trial, flops)
                self.infeasible += 1
                continue
            original = S.find_repeat(self.study, trial)
            if original is not None:  # samplers do re-propose categorical points: never train one twice
                S.tell_repeat(self.study, trial, original)
                self.repeats += 1
                continue
            coordination.claim(self.study, trial)  # issue 11: ends this trial's turn
            self.live[trial_id], self.history[trial_id] = trial, []
            return {"config": config.to_dict(), "flops": flops, "number": trial.number}
        raise RuntimeError(f"the sampler proposed {self.max_proposals} candidates in a row that were over the budget "
                           "or already trained; the space may be exhausted")

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self.live and "val_acc" in result:
            S.report_epoch(self.study, self.live[trial_id], float(result["val_acc"]), int(result["epoch"]),
                           self.history[trial_id])
            record_placement(self.live[trial_id], result)  # issue 11: the node it ran on

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if not error and result and "val_acc" in result and int(result["epoch"]) > len(self.history.get(trial_id, [])):
            self.on_trial_result(trial_id, result)  # Ray hands a trial's last result only to on_trial_complete
        trial = self.live.pop(trial_id, None)
        self.history.pop(trial_id, None)
        if trial is not None:
            if error:  # issue 11: a reason marks a failure of the candidate itself, not of a lost driver
                trial.set_user_attr("fail_reason", "the trial raised an error; see search.log")
            S.tell_result(self.study, trial, None if error else result, self.max_epochs)

    def close_pending(self, last_results: dict[str, dict[str, Any]]) -> None:
        """Trials Ray stopped without completing (time budget): closed with their last result, if any."""
        for trial_id in list(self.live):
            self.on_trial_complete(trial_id, last_results.get(trial_id))
