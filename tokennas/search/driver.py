"""Run a search: validate everything first, then Optuna + Ray Tune, then re-ranking, then the reports.

Nothing is written before every input has been checked, and the run folder appears whole: its
``search.yaml`` and ``study.db`` are made in a hidden staging folder and renamed into place. The run
folder holds ``search.yaml`` (the settings, which ``--resume`` reads), ``study.db`` (the Optuna
studies), ``ray/`` (Ray Tune's trial folders and checkpoints), ``search.log`` (Ray's own output) and the
reports.

Stages, each a Ray Tune experiment whose trials are recorded in the study as they finish:
1. the search: the sampler's candidates, plus the space's uniform baseline as a reference trial;
2. re-ranking: the top ``retrain_top`` candidates and the baseline, trained again from scratch for
   ``retrain_epochs`` with ``retrain_seeds`` seeds each; the final ranking uses their mean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from ..data import DataBundle, load_data
from ..flops import format_flops
from ..spaces import Inputs
from ..train import TrainSettings
from . import study as S
from .settings import SearchSettings, load_settings, parse_duration, save_settings


class SearchFailed(RuntimeError):
    """The search ran but cannot give a result (failures, nothing trained); the CLI exits 1."""


@dataclasses.dataclass
class Prepared:
    data: DataBundle
    inputs: Inputs
    space: Any
    feasible: dict[str, dict[str, Any]]


def prepare(settings: SearchSettings) -> Prepared:
    """Check every input and load the data; raises ValueError before anything is written."""
    settings.validate()
    data = load_data(settings.dataset, settings.data_dir, settings.img_size, settings.train_subset,
                     seed=settings.seed, augment=settings.augment)
    if settings.batch_size > len(data.train):
        raise ValueError(f"invalid --batch-size {settings.batch_size}; expected at most {len(data.train)}, the size "
                         "of the training split")
    inputs = Inputs(settings.img_size, data.in_chans, data.num_classes)
    space = settings.space_object()
    feasible, smallest = space.feasible(settings.budget, inputs)
    if not feasible:
        raise ValueError(f"no {settings.space} candidate fits --flops {settings.flops}: the smallest reaches "
                         f"{format_flops(smallest)} ({smallest:,} MACs) at {settings.img_size}px")
    if len(feasible) < settings.trials:
        raise ValueError(f"invalid --trials {settings.trials}: only {len(feasible)} distinct {settings.space} "
                         f"candidates fit --flops {settings.flops} at {settings.img_size}px; ask for at most "
                         f"{len(feasible)} or raise the budget")
    return Prepared(data, inputs, space, feasible)


def create_run(settings: SearchSettings, out: Path | None) -> Path:
    """The run folder with ``search.yaml`` and an empty study, created whole or not at all."""
    run_dir = out or Path("results") / f"{settings.space}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ValueError(f"--out {str(run_dir)!r} already holds files; use --resume {run_dir} or another --out")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}-"))
    try:
        save_settings(settings, staging / "search.yaml")
        S.open_study(staging, settings.objective, create=True)
        if run_dir.exists():
            run_dir.rmdir()  # empty, checked above
        staging.rename(run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return run_dir


def resume_settings(run_dir: Path, overrides: dict[str, Any]) -> SearchSettings:
    """The stored settings, with the options ``--resume`` may change (``SearchSettings.RESUMABLE``)."""
    stored = load_settings(run_dir)
    if not (run_dir / "study.db").is_file():
        raise ValueError(f"{str(run_dir)!r} has no study.db; remove the folder and start the search again")
    fixed = sorted(k for k in overrides if k not in SearchSettings.RESUMABLE)
    if fixed:
        name, allowed = fixed[0], ", ".join("--" + k.replace("_", "-") for k in SearchSettings.RESUMABLE)
        raise ValueError(f"--{name.replace('_', '-')} cannot change on --resume (the run has "
                         f"{getattr(stored, name)!r}); only {allowed} can")
    return dataclasses.replace(stored, **overrides)


def run_search(settings: SearchSettings | None, out: Path | None = None, resume: Path | None = None,
               progress: bool = True, overrides: dict[str, Any] | None = None) -> Path:
    """Run (or resume, or extend) a search, re-rank its best, and write the reports; returns the run folder.

    Raises ``SearchFailed`` (after writing the reports) when the search stopped on failures or trained
    nothing; ``ValueError`` for bad input, before anything is written."""
    if resume is not None:
        run_dir = resume
        settings = resume_settings(run_dir, overrides or {})
        prepared = prepare(settings)
        save_settings(settings, run_dir / "search.yaml")
    else:
        prepared = prepare(settings)
        run_dir = create_run(settings, out)

    study = S.open_study(run_dir, settings.objective)
    # a resumed sampler must not replay the draws of the first run
    study.sampler = S.make_sampler(settings.sampler, settings.seed + len(study.trials), settings.trials)
    S.resume_interrupted(study)
    runs = S.open_runs(study)
    for run in runs.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        runs._storage.set_trial_user_attr(run._trial_id, "interrupted", "the search was killed")
        runs.tell(run.number, state=TrialState.FAIL)

    from .report import write_reports

    deadline = time.monotonic() + parse_duration(settings.time_budget) if settings.time_budget else None
    try:
        with ray_session(settings, run_dir):
            if _needs_search(settings, study, runs):
                _tune(settings, prepared, study, run_dir, "search", baseline_jobs(settings, prepared, runs), deadline,
                      progress)
            jobs = retrain_jobs(settings, study, runs, prepared) if not _stopped(settings, study, runs) else []
            if jobs and (deadline is None or deadline > time.monotonic()):
                _tune(settings, prepared, study, run_dir, "retrain", jobs, deadline, progress)
    except BaseException:
        with contextlib.suppress(Exception):  # what was recorded is reported; the original error goes on
            write_reports(run_dir)
        raise
    write_reports(run_dir)
    _raise_on_failure(settings, study, runs)
    return run_dir


# -- what each stage still has to do, read from the studies so that resume and extension just work --
def _trained(study) -> int:
    return sum(S.trained(t) for t in study.get_trials(deepcopy=False))


def _stopped(settings: SearchSettings, study, runs) -> bool:
    return len(S.failures(study, runs)) >= settings.max_failures


def _needs_search(settings: SearchSettings, study, runs) -> bool:
    if _stopped(settings, study, runs):
        return False
    return _trained(study) < settings.trials or not _has_run(runs, "search", "baseline", settings.seed)


def _has_run(runs, stage: str, source: Any, seed: int) -> bool:
    """A run that finished or failed with an error (an interrupted one is run again)."""
    return any(t.user_attrs.get("stage") == stage and t.user_attrs.get("source") == source
               and t.user_attrs.get("seed") == seed and (t.state == TrialState.COMPLETE or "error" in t.user_attrs)
               for t in runs.get_trials(deepcopy=False))


def _job(role: str, stage: str, source: Any, seed: int, config, epochs: int) -> dict[str, Any]:
    config = config if isinstance(config, dict) else config.to_dict()
    from ..config import config_from_dict

    built = config_from_dict(config)
    return {"role": role, "stage": stage, "source": source, "seed": seed, "config": config,
            "flops": sum(built.flops_by_module().values()), "params": built.num_params(), "epochs_planned": epochs}


def baseline_jobs(settings: SearchSettings, prepared: Prepared, runs) -> list[dict[str, Any]]:
    """The uniform baseline at the search's fidelity, unless it already ran."""
    baseline = prepared.space.baseline(settings.budget, prepared.inputs)
    if baseline is None or _has_run(runs, "search", "baseline", settings.seed):
        return []
    return [_job("baseline", "search", "baseline", settings.seed, baseline, settings.epochs)]


def retrain_seeds(settings: SearchSettings) -> list[int]:
    return [settings.seed + 1 + i for i in range(settings.retrain_seeds)]


def retrain_jobs(settings: SearchSettings, study, runs, prepared: Prepared) -> list[dict[str, Any]]:
    """The top candidates of the search and the baseline, for each re-ranking seed, that have not run yet."""
    if settings.retrain_top == 0:
        return []
    from .report import ranked, trial_table

    top = ranked(trial_table(study), settings.objective).head(settings.retrain_top)
    chosen = set(top["number"])
    configs = {t.number: t.user_attrs["config"] for t in study.get_trials(deepcopy=False) if t.number in chosen}
    sources: list[tuple[str, Any, Any]] = [("candidate", int(n), configs[int(n)]) for n in top["number"]]
    baseline = prepared.space.baseline(settings.budget, prepared.inputs)
    if baseline is not None and sources:
        sources.append(("baseline", "baseline", baseline))
    return [_job(role, "retrain", source, seed, config, settings.retrain_epochs)
            for seed in retrain_seeds(settings) for role, source, config in sources
            if not _has_run(runs, "retrain", source, seed)]


def _raise_on_failure(settings: SearchSettings, study, runs) -> None:
    failures = S.failures(study, runs)
    first = min(failures, key=lambda t: t.datetime_start or t.datetime_complete) if failures else None
    where = (f"trial {first.number}" if first is not None and first.user_attrs.get("role") is None
             else f"{first.user_attrs.get('role')} run" if first is not None else "")
    if len(failures) >= settings.max_failures:
        raise SearchFailed(f"the search stopped after {len(failures)} failed trials (--max-failures "
                           f"{settings.max_failures}); first: {where}: {first.user_attrs['error']}")
    if _trained(study) == 0:
        reason = f"; first error: {where}: {first.user_attrs['error']}" if first is not None else ""
        raise SearchFailed(f"the search trained no candidate{reason}")


# -- Ray --
@contextlib.contextmanager
def ray_session(settings: SearchSettings, run_dir: Path):
    """A local Ray instance for the run, its output in ``search.log``; started only when it is needed."""
    import ray
    import torch

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    log = logging.FileHandler(run_dir / "search.log")
    for name in ("ray", "ray.tune", "ray.train"):
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [log], False
    with open(run_dir / "search.log", "a") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 configure_logging=False, num_gpus=torch.cuda.device_count())
    try:
        yield
    finally:
        ray.shutdown()


def train_candidate(params: dict[str, Any], data: DataBundle) -> None:
    """Ray Tune function trainable: one run, one report and checkpoint per epoch, resumable from Ray's
    checkpoint (a retried trial) or from the last checkpoint of the interrupted trial it replaces."""
    import torch
    from ray import tune

    from ..config import config_from_dict
    from ..train import fit

    torch.set_num_threads(max(1, int(params["cpus"])))
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is None and params.get("resume_from"):
        checkpoint = tune.Checkpoint(params["resume_from"])
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)

    def on_epoch(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state, Path(folder) / "state.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    settings = TrainSettings(**{**params["train"], "epochs": params["epochs"],
                                "seed": params.get("seed", params["train"]["seed"])})
    fit(config_from_dict(params["config"]), data, settings, on_epoch, resume)


def _tune(settings: SearchSettings, prepared: Prepared, study, run_dir: Path, stage: str, jobs: list[dict[str, Any]],
          deadline: float | None, progress: bool):
    from ray import tune

    from .progress import LiveTable
    from .schedulers import make_scheduler
    from .searcher import BudgetSearcher, JobSearcher, TrialEvents

    gpus = settings.gpus()
    train = {"batch_size": settings.batch_size, "lr": settings.lr, "seed": settings.seed, "augment": settings.augment,
             "device": "cuda" if gpus > 0 else "cpu", "workers": max(0, int(settings.cpus_per_trial) - 1)}
    if stage == "search":
        searcher = BudgetSearcher(study, prepared.space, prepared.inputs, settings.budget, settings.epochs,
                                  trials=settings.trials, max_failures=settings.max_failures,
                                  feasible=prepared.feasible, jobs=jobs, seed=settings.seed + len(study.trials))
        scheduler = make_scheduler(settings.scheduler, settings.objective, settings.epochs,
                                   TrainSettings().warmup_epochs)
        total = settings.trials - _trained(study) + len(jobs)
    else:
        searcher = JobSearcher(study, jobs, max_failures=settings.max_failures - len(S.failures(study,
                                                                                             S.open_runs(study))))
        scheduler = make_scheduler("fifo", settings.objective, settings.retrain_epochs, 0)
        total = len(jobs)
    table = LiveTable(searcher, settings, total, stage=stage, enabled=progress)
    trainable = tune.with_resources(tune.with_parameters(train_candidate, data=prepared.data),
                                    {"cpu": settings.cpus_per_trial, "gpu": gpus})
    tuner = tune.Tuner(
        trainable,
        param_space={"train": train, "cpus": settings.cpus_per_trial},  # merged into every suggestion
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, metric="val_acc", mode="max", num_samples=-1,
            reuse_actors=True, time_budget_s=max(1.0, deadline - time.monotonic()) if deadline else None),
        run_config=tune.RunConfig(
            name=f"{stage}-{len(study.trials)}", storage_path=str((run_dir / "ray").resolve()), verbose=0,
            log_to_file=True, callbacks=[table, TrialEvents(searcher)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    with table:
        tuner.fit()
    searcher.close_pending("cut by --time-budget")
    return searcher
