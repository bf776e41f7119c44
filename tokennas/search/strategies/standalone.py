"""The standalone strategy (the default): every candidate is trained from scratch as its own Ray Tune trial, with
ASHA (or Pareto rungs) stopping weak ones after the warm-up; the uniform baseline trains beside them as a
reference at the same fidelity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...config import ModelConfig
from ...train import TrainSettings
from ..settings import SearchSettings
from ..stages import Prepared, StageContext, baseline_jobs, trained_count
from ..tune.schedulers import make_scheduler
from ..tune.searcher import BudgetSearcher
from ..tune.trainable import run_stage


class Standalone:
    name = "standalone"
    # each candidate costs minutes of training, so the sampler gets many tries before an untried one is handed out
    stall = 20
    evaluated = "trained"
    options: tuple[str, ...] = ()
    no_retrain = ""  # its re-ranking runs are at least one epoch long (--retrain-epochs >= 1)
    score_images = SearchSettings.score_images  # not read

    def validate(self, settings: SearchSettings) -> None:
        pass

    def check(self, settings: SearchSettings, prepared: Prepared) -> None:
        pass

    def search_stage(self, ctx: StageContext) -> None:
        settings = ctx.settings
        jobs = baseline_jobs(ctx, self.search_epochs(settings))
        searcher = BudgetSearcher(ctx.study, ctx.prepared.space, ctx.prepared.inputs, settings.budget,
                                  settings.epochs, stall=self.stall, trials=settings.trials,
                                  max_failures=settings.max_failures, feasible=ctx.prepared.feasible, jobs=jobs,
                                  seed=settings.proposal_seed + len(ctx.study.trials), keep_going=ctx.time_left)
        scheduler = make_scheduler(settings.scheduler, settings.objective, settings.epochs,
                                   TrainSettings().warmup_epochs)
        run_stage(ctx, "search", searcher, settings.trials - trained_count(ctx.study) + len(jobs), scheduler)

    def unfinished(self, ctx: StageContext) -> str | None:
        return None

    def retrain_start(self, settings: SearchSettings, run_dir: Path, config: ModelConfig) -> dict[str, Any] | None:
        return {}

    def search_epochs(self, settings: SearchSettings) -> int:
        return settings.epochs

    def retrain_epochs(self, settings: SearchSettings) -> int:
        return settings.retrain_epochs

    def describe(self, settings: SearchSettings, run_dir: Path) -> list[str]:
        return [f"- strategy: standalone, every candidate trained from scratch for up to {settings.epochs} epochs"]
