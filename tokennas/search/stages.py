"""What a run's stages share: the checked inputs, the stage context a strategy receives, and what each stage still
has to do, read from the studies so that resume and extension just work.

A *job* is one reference or re-ranking run (the uniform baseline, a top candidate on one seed): a trial of the runs
study, keyed by ``(stage, source, seed, epochs_planned)``. Runs of another length are other jobs, never averaged
with these (a ``--resume`` with other ``--retrain-epochs`` trains every re-ranked run again at the new length).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..config import ModelConfig, config_from_dict
from ..data import DataBundle
from ..spaces import Inputs
from .settings import SearchSettings
from .studies import study as S


@dataclasses.dataclass
class Prepared:
    """Every input checked and the data loaded, before anything is written."""

    data: DataBundle
    inputs: Inputs
    space: Any
    feasible: dict[str, dict[str, Any]]  # canonical config key -> parameters, every distinct feasible candidate
    baseline: ModelConfig | None = None  # the uniform reference, when the strategy can evaluate it
    baseline_note: str = ""  # why there is no baseline, in the summary's words
    latency: Any = None  # the latency model (tokennas.latency) when the search predicts latency, measured here


@dataclasses.dataclass
class StageContext:
    """What a strategy's search stage gets from the driver."""

    settings: SearchSettings
    prepared: Prepared
    study: optuna.Study
    runs: optuna.Study
    run_dir: Path
    deadline: float | None  # time.monotonic() at which --time-budget ends the run
    progress: bool
    stop: Any = None  # signals.GracefulStop: its ``signum`` once SIGINT or SIGTERM asked the run to stop

    def time_left(self) -> bool:
        """Neither the deadline has passed nor a signal asked the run to stop."""
        return (self.deadline is None or self.deadline > time.monotonic()) and not self.stopped_by_signal

    @property
    def stopped_by_signal(self) -> str:
        """The signal's name (SIGINT, SIGTERM) once one asked the run to stop, else ''."""
        return self.stop.name if self.stop is not None else ""

    def cut_reason(self) -> str:
        """Why a stage was cut short when ``time_left()`` is False."""
        return f"stopped by {self.stopped_by_signal}" if self.stopped_by_signal else "cut by --time-budget"


def trained_count(study: optuna.Study) -> int:
    return sum(S.trained(t) for t in study.get_trials(deepcopy=False))


def has_run(runs: optuna.Study, job: dict[str, Any]) -> bool:
    """The job finished, or failed with an error (an interrupted run is run again)."""
    key = S.job_key(job)
    return any(S.job_key(t.user_attrs) == key and (t.state == TrialState.COMPLETE or "error" in t.user_attrs)
               for t in runs.get_trials(deepcopy=False))


def resume_point(runs: optuna.Study, job: dict[str, Any]) -> str | None:
    """The last checkpoint of an interrupted run of this job (a killed driver, --time-budget), if it is still
    there: the job goes on from it instead of from epoch 0."""
    key = S.job_key(job)
    cut = [t.user_attrs["checkpoint"] for t in runs.get_trials(deepcopy=False, states=(TrialState.FAIL,))
           if S.job_key(t.user_attrs) == key and "interrupted" in t.user_attrs
           and "checkpoint" in t.user_attrs and Path(t.user_attrs["checkpoint"]).exists()]  # none before epoch 1
    return cut[-1] if cut else None


def make_job(role: str, stage: str, source: Any, seed: int, config: ModelConfig | dict, epochs: int,
             runs: optuna.Study | None = None) -> dict[str, Any]:
    """One run to hand to Ray; with ``runs``, it resumes from its interrupted predecessor's checkpoint."""
    built = config if isinstance(config, ModelConfig) else config_from_dict(config)
    job = {"role": role, "stage": stage, "source": source, "seed": seed, "config": built.to_dict(),
           "flops": sum(built.flops_by_module().values()), "params": built.num_params(), "epochs_planned": epochs}
    resume = resume_point(runs, job) if runs is not None else None
    if resume:
        job["resume_from"] = resume
    return job


def baseline_jobs(ctx: StageContext, epochs: int) -> list[dict[str, Any]]:
    """The uniform baseline at the search's fidelity, unless there is none or it already ran."""
    baseline = ctx.prepared.baseline
    if baseline is None:
        return []
    job = make_job("baseline", "search", "baseline", ctx.settings.seed, baseline, epochs, ctx.runs)
    return [] if has_run(ctx.runs, job) else [job]
