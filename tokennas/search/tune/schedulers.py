"""Early stopping that waits for a signal: ASHA's first rung comes after the warm-up, and only
candidates are ever stopped (the baseline and re-ranking runs always finish).

In Pareto mode ``ParetoRungs`` stops a candidate at a rung only when it is both in the bottom of the
rung by accuracy (ASHA's cut) and dominated there: another candidate reached the rung with at least
its accuracy at no more FLOPs. The cheap, less accurate models the front exists for are never cut for
being less accurate. Ray has no multi-objective scheduler, and Optuna's multi-objective studies have
no pruners, so the rule lives here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler


def first_rung(epochs: int, warmup_epochs: float) -> int:
    """The first epoch at which a candidate may be judged: after the warm-up, and no earlier than a quarter of
    the training (on the ground-truth curves the top third at epoch 1 of 8 agreed with the final top third for
    74% of candidates, at epoch 2 for 80%; benchmarks/RESULTS.md)."""
    return min(epochs, max(math.floor(min(warmup_epochs, epochs / 3)) + 1, round(epochs / 4)))


def is_candidate(trial: Any) -> bool:
    return trial.config.get("role", "candidate") == "candidate"


class CandidateASHA(ASHAScheduler):
    """Ray's ASHA on ``epoch``, applied to searched candidates only."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if not is_candidate(trial) or "error" in result:  # a failure's last result is no evidence
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if not is_candidate(trial):
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)


class ParetoRungs(FIFOScheduler):
    """Asynchronous rungs that stop only dominated, below-the-cut candidates (Pareto mode)."""

    def __init__(self, grace_period: int, max_t: int, reduction_factor: float = 3, metric: str = "val_acc",
                 time_attr: str = "epoch") -> None:
        super().__init__()  # the metric is the Tuner's; ``metric`` names the result key read here
        self.rungs, rung = [], grace_period
        while rung < max_t:
            self.rungs.append(rung)
            rung = max(rung + 1, math.ceil(rung * reduction_factor))
        self.reduction_factor, self.metric_key, self.time_attr = reduction_factor, metric, time_attr
        self.records: dict[int, list[tuple[float, float]]] = {r: [] for r in self.rungs}

    def decide(self, rung: int, acc: float, flops: float) -> str:
        """Record a candidate at a rung and say whether it goes on."""
        seen = self.records[rung]
        others = list(seen)
        seen.append((acc, flops))
        cutoff = np.percentile([a for a, _ in seen], 100 * (1 - 1 / self.reduction_factor))
        dominated = any(a >= acc and f <= flops and (a > acc or f < flops) for a, f in others)
        return TrialScheduler.STOP if acc < cutoff and dominated else TrialScheduler.CONTINUE

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        epoch = result.get(self.time_attr)
        if not is_candidate(trial) or epoch not in self.records or self.metric_key not in result or "error" in result:
            return TrialScheduler.CONTINUE
        return self.decide(epoch, float(result[self.metric_key]), float(trial.config.get("flops", 0)))


def make_scheduler(name: str, objective: str, epochs: int, warmup_epochs: float) -> TrialScheduler:
    """FIFO, or rungs from the first epoch after warm-up: ASHA in accuracy mode, ``ParetoRungs`` in Pareto mode."""
    grace = first_rung(epochs, warmup_epochs)
    if name == "fifo" or grace >= epochs:
        return FIFOScheduler()
    if objective == "pareto":
        return ParetoRungs(grace, epochs)
    return CandidateASHA(time_attr="epoch", max_t=epochs, grace_period=grace, reduction_factor=3)
