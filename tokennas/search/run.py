"""Run a search: validate everything first, open the study's storage, join Ray, run the stages, write the reports.

Nothing is written before every input has been checked, the study's storage opened and Ray joined
(``--storage``, ``--ray-address``), and the run folder appears whole: its ``search.yaml`` and
``study.db`` are made in a hidden staging folder and renamed into place. The run folder holds
``search.yaml`` (the settings, which ``--resume`` reads; never a password), ``study.db`` (the Optuna
studies, unless ``--storage`` puts them on a server), ``ray/`` (Ray Tune's trial folders and checkpoints,
unless ``--ray-storage``), ``search.log`` (Ray's own output) and the reports.

Stages, each recorded in the studies as its trials finish:
1. the search, run by the strategy (``strategies/``): the sampler's candidates, plus the space's uniform baseline
   as a reference;
2. re-ranking: the top ``retrain_top`` candidates and the baseline, trained again for ``retrain_epochs`` with
   ``retrain_seeds`` seeds each (the strategy says how a run starts); the final ranking uses their mean.
A stage that did not run completely is recorded as such in the study (``stages``), named in the summary, and makes
the search exit 1 (``SearchFailed``), unless the user asked for less (``--retrain-top 0``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

from ..config import config_from_dict
from ..data import load_data
from ..flops import count_flops, format_flops
from ..report import write_reports
from ..report.tables import ranked, trial_table
from ..spaces import Inputs
from ..train import check_folder_path
from . import strategies
from .settings import SearchSettings, load_settings, parse_duration, save_settings
from .signals import GracefulStop, Interrupted
from .stages import Prepared, StageContext, has_run, make_job, trained_count
from .studies import study as S
from .studies.storage import check_compatible, check_encoding, is_shared, open_storage, recover_lost_trials, redact
from .tune import cluster
from .tune.searcher import RunsSearcher
from .tune.trainable import log_to, run_stage


class SearchFailed(RuntimeError):
    """The search ran but cannot give a whole result (failures, nothing trained, a stage cut short); the CLI
    exits 1."""


def prepare(settings: SearchSettings) -> Prepared:
    """Check every input and load the data; raises ValueError before anything is written."""
    settings.validate()
    strategy = strategies.validate(settings)
    data = load_data(settings.dataset, settings.data_dir, settings.img_size, settings.train_subset,
                     seed=settings.seed, augment=settings.augment)
    if settings.batch_size > len(data.train):
        raise ValueError(f"invalid --batch-size {settings.batch_size}; expected at most {len(data.train)}, the size "
                         "of the training split")
    inputs = Inputs(settings.img_size, data.in_chans, data.num_classes)
    space = settings.space_object(inputs)
    feasible, smallest = space.feasible(settings.budget, inputs)
    if not feasible and (getattr(space, "enumerable", True) or smallest > settings.budget):
        raise ValueError(f"no {settings.space} candidate fits --flops {settings.flops}: the smallest reaches "
                         f"{format_flops(smallest)} ({smallest:,} MACs) at {settings.img_size}px")
    if getattr(space, "enumerable", True) and len(feasible) < settings.trials:
        raise ValueError(f"invalid --trials {settings.trials}: only {len(feasible)} distinct {settings.space} "
                         f"candidates fit --flops {settings.flops} at {settings.img_size}px; ask for at most "
                         f"{len(feasible)} or raise the budget")
    # the baseline is a reference for the space: it never costs more than the space's own largest candidate, so a
    # budget far above the space (--flops 1e99) does not make it a giant (a continuous space is bounded by its trunk)
    largest = max(count_flops(space.build(params, inputs)) for params in feasible.values()) if feasible else \
        settings.budget
    baseline = space.baseline(min(settings.budget, largest), inputs)
    prepared = Prepared(data, inputs, space, feasible, baseline,
                        "" if baseline is not None else "none fits the budget")
    strategy.check(settings, prepared)
    return prepared


def new_run_dir(settings: SearchSettings, out: Path | None) -> Path:
    run_dir = out or Path("results") / f"{settings.space}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_folder_path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ValueError(f"--out {str(run_dir)!r} already holds files; use --resume {run_dir} or another --out")
    return run_dir


def create_run(settings: SearchSettings, run_dir: Path, storage: Any) -> Path:
    """The run folder with ``search.yaml`` and the study (in ``study.db``, or joined in a shared storage),
    created whole or not at all."""
    run_dir = new_run_dir(settings, run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}-"))
    try:
        save_settings(settings, staging / "search.yaml")
        S.close(S.open_study(storage if is_shared(storage) else staging, settings.objective, create=True,
                             study_name=settings.study_name))
        if run_dir.exists():
            run_dir.rmdir()  # empty, checked above
        staging.rename(run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return run_dir


def resume_settings(run_dir: Path, overrides: dict[str, Any]) -> SearchSettings:
    """The stored settings, with the options ``--resume`` may change (``SearchSettings.RESUMABLE``).
    ``--storage`` may be given again with its password (the stored URL has none)."""
    # --time-budget bounds one invocation: a resumed run has none unless it is given again
    stored = dataclasses.replace(load_settings(run_dir), time_budget=None)
    if not stored.storage and not (run_dir / "study.db").is_file():
        raise ValueError(f"{str(run_dir)!r} has no study.db; remove the folder and start the search again")
    if "storage" in overrides and overrides["storage"] and redact(overrides["storage"]) == stored.storage:
        stored = dataclasses.replace(stored, storage=overrides.pop("storage"))
    fixed = sorted(k for k in overrides if k not in SearchSettings.RESUMABLE)
    if fixed:
        name, allowed = fixed[0], ", ".join("--" + k.replace("_", "-") for k in SearchSettings.RESUMABLE)
        raise ValueError(f"--{name.replace('_', '-')} cannot change on --resume (the run has "
                         f"{getattr(stored, name)!r}); only {allowed} can")
    return dataclasses.replace(stored, **overrides)


def run_search(settings: SearchSettings | None, out: Path | None = None, resume: Path | None = None,
               progress: bool = True, overrides: dict[str, Any] | None = None) -> Path:
    """Run (or resume, or extend) a search, re-rank its best, and write the reports; returns the run folder.

    Raises ``SearchFailed`` (after writing the reports) when the search stopped on failures, trained nothing or
    left a stage incomplete; ``ValueError`` for bad input, before anything is written."""
    with GracefulStop() as stop:
        return _run(settings, out, resume, progress, overrides, stop)


def _run(settings: SearchSettings | None, out: Path | None, resume: Path | None, progress: bool,
         overrides: dict[str, Any] | None, stop: GracefulStop) -> Path:
    if resume is not None:
        run_dir = resume
        settings = resume_settings(run_dir, overrides or {})
        prepared = prepare(settings)
    else:
        prepared = prepare(settings)
        run_dir = new_run_dir(settings, out)
    deadline = time.monotonic() + parse_duration(settings.time_budget) if settings.time_budget else None
    # the study's storage and Ray are joined (and an image folder checked on every node) before anything is
    # written; the password stays in the storage object, never in the settings
    storage = open_storage(settings.storage, run_dir, settings.heartbeat)
    settings = dataclasses.replace(settings, storage=redact(settings.storage))
    cluster.connect(settings.ray_address, _gpu_count())
    stop.arm()
    try:
        cluster.check_data_dir(settings.data_dir if settings.dataset in ("folder", "imagefolder") else None)
        if settings.gpus() > 0 and not cluster.has_gpus():
            raise ValueError(f"invalid --gpus-per-trial {settings.gpus_per_trial}: the Ray cluster has no GPU")
        if is_shared(storage):  # several drivers may share this study: they must run the same search
            check_compatible(S.open_study(storage, settings.objective, create=True, study_name=settings.study_name),
                             dataclasses.asdict(settings), resume is not None,
                             {f.name: f.default for f in dataclasses.fields(SearchSettings)})
        if resume is not None:
            save_settings(settings, run_dir / "search.yaml")
        else:
            run_dir = create_run(settings, run_dir, storage)
        log_to(run_dir / "search.log")
        study, runs = _open_studies(settings, storage, resume is not None,
                                    prepared.space.distributions(prepared.inputs))
        ctx = StageContext(settings, prepared, study, runs, run_dir, deadline, progress, stop)
        _stages(ctx)
    finally:
        cluster.disconnect()
    if ctx.stopped_by_signal:
        raise Interrupted(stop.signum, f"stopped by {ctx.stopped_by_signal}: {_progress_note(ctx)}; the reports "
                                       f"are written; `tokennas search --resume {run_dir}` completes the run")
    _raise_on_failure(ctx)
    return run_dir


def _progress_note(ctx: StageContext) -> str:
    stages = ctx.study.user_attrs.get("stages", {})
    return "; ".join(f"{label}: {stages[stage]['note']}" for stage, label in (("search", "search"),
                                                                              ("retrain", "re-ranking"))
                     if stage in stages)


def _open_studies(settings: SearchSettings, storage: Any, resume: bool, distributions: dict[str, Any]):
    study = S.open_study(storage, settings.objective, study_name=settings.study_name)
    check_encoding(study, distributions, settings.space)  # before anything is enqueued
    # a resumed sampler must not replay the draws of the first run, nor drivers started together each other's
    offset = len(study.trials) + (os.getpid() if is_shared(storage) else 0)
    study.sampler = S.make_sampler(settings.sampler, settings.proposal_seed + offset, settings.trials)
    recover_lost_trials(study, resume)
    runs = S.open_runs(study)
    recover_lost_trials(runs, resume, enqueue=False)
    return study, runs


def _stages(ctx: StageContext) -> None:
    """The strategy's search stage, then re-ranking; each stage's outcome is recorded in the study (``stages``)
    before the reports are written, also when a stage raised."""
    settings, study = ctx.settings, ctx.study
    strategy = strategies.get_strategy(settings.strategy)
    baseline = ctx.prepared.baseline
    describe = getattr(ctx.prepared.space, "describe_baseline", None)
    study.set_user_attr("baseline", {"config": baseline.to_dict() if baseline else None,
                                     "note": ctx.prepared.baseline_note,
                                     "label": describe(baseline) if describe and baseline else None})
    if ctx.prepared.latency is not None:  # the model every proposal's latency is predicted with, and its budget
        study.set_user_attr("latency", {**ctx.prepared.latency.record(), "budget_ms": settings.latency})
    try:
        if _needs_search(ctx):
            strategy.search_stage(ctx)
        search = _search_status(ctx)
        _record(study, "search", search)
        if settings.retrain_top == 0:
            _record(study, "retrain", {"done": True, "note": "not asked for (--retrain-top 0)", "asked": False})
        elif strategy.retrain_epochs(settings) == 0:
            _record(study, "retrain", {"done": True, "note": f"not asked for ({strategy.no_retrain})", "asked": False})
        elif not search["done"]:
            _record(study, "retrain", {"done": False, "note": "not run: the search stage is incomplete"})
        else:
            jobs, skipped = retrain_jobs(ctx, strategy)
            if jobs and ctx.time_left():
                epochs = max(j["epochs_planned"] for j in jobs)
                run_stage(ctx, "retrain", RunsSearcher(study, jobs, settings.max_failures, epochs), len(jobs))
            _record(study, "retrain", _retrain_status(ctx, strategy, skipped))
    except BaseException:
        with contextlib.suppress(Exception):  # what was recorded is reported; the original error goes on
            write_reports(ctx.run_dir)
        raise
    write_reports(ctx.run_dir)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _record(study: optuna.Study, stage: str, status: dict[str, Any]) -> None:
    stages = dict(study.user_attrs.get("stages", {}))
    stages[stage] = status
    study.set_user_attr("stages", stages)


def _stopped(ctx: StageContext) -> bool:
    return len(S.failures(ctx.study, ctx.runs)) >= ctx.settings.max_failures


def _needs_search(ctx: StageContext) -> bool:
    if _stopped(ctx):
        return False
    baseline = ctx.prepared.baseline
    epochs = strategies.get_strategy(ctx.settings.strategy).search_epochs(ctx.settings)
    return trained_count(ctx.study) < ctx.settings.trials or (
        baseline is not None and not has_run(ctx.runs, make_job("baseline", "search", "baseline", ctx.settings.seed,
                                                                  baseline, epochs))) \
        or strategies.get_strategy(ctx.settings.strategy).unfinished(ctx) is not None


def _search_status(ctx: StageContext) -> dict[str, Any]:
    trained = trained_count(ctx.study)
    left = strategies.get_strategy(ctx.settings.strategy).unfinished(ctx) if trained >= ctx.settings.trials else None
    if trained >= ctx.settings.trials and left is None:
        return {"done": True, "note": f"{trained} candidates evaluated"}
    if left is not None:
        return {"done": False, "note": f"{trained} candidates evaluated, but {left}"}
    why = ("stopped by --max-failures" if _stopped(ctx) else ctx.cut_reason() if not ctx.time_left()
           else "ended early")
    return {"done": False, "note": f"{trained} of {ctx.settings.trials} candidates evaluated: {why}"}


def retrain_seeds(settings: SearchSettings) -> list[int]:
    return [settings.seed + 1 + i for i in range(settings.retrain_seeds)]


def retrain_plan(ctx: StageContext, strategy) -> tuple[list[dict[str, Any]], list[str]]:
    """Every re-ranking run the settings ask for (the top candidates and the baseline, on each seed), and what
    cannot be re-ranked by this strategy, with why."""
    settings = ctx.settings
    top = ranked(trial_table(ctx.study), settings.objective).head(settings.retrain_top)
    configs = {t.number: t.user_attrs["config"] for t in ctx.study.get_trials(deepcopy=False)
               if t.number in set(top["number"])}
    sources: list[tuple[str, Any, Any]] = [("candidate", int(n), configs[int(n)]) for n in top["number"]]
    if ctx.prepared.baseline is not None and sources:
        sources.append(("baseline", "baseline", ctx.prepared.baseline))
    epochs = strategy.retrain_epochs(settings)
    plan, skipped = [], []
    for role, source, config in sources:
        start = strategy.retrain_start(settings, ctx.run_dir, config_from_dict(config) if isinstance(config, dict)
                                       else config)
        if start is None:
            skipped.append(f"{source}: the {strategy.name} strategy cannot re-rank it")
            continue
        plan += [{**make_job(role, "retrain", source, seed, config, epochs, ctx.runs), **start}
                 for seed in retrain_seeds(settings)]
    return plan, skipped


def retrain_jobs(ctx: StageContext, strategy) -> tuple[list[dict[str, Any]], list[str]]:
    """The planned re-ranking runs that have not run yet (a run cut by a kill resumes from its checkpoint)."""
    plan, skipped = retrain_plan(ctx, strategy)
    return [job for job in plan if not has_run(ctx.runs, job)], skipped


def _retrain_status(ctx: StageContext, strategy, skipped: list[str]) -> dict[str, Any]:
    plan, _ = retrain_plan(ctx, strategy)
    states = {S.job_key(t.user_attrs): t.state.name for t in ctx.runs.get_trials(deepcopy=False)
              if t.user_attrs.get("stage") == "retrain" and (t.state.name == "COMPLETE" or "error" in t.user_attrs)}
    outcome = [states.get(S.job_key(j), "MISSING") for j in plan]
    complete, failed = outcome.count("COMPLETE"), outcome.count("FAIL")
    note = f"{complete} of {len(plan)} runs complete"
    if failed:
        note += f", {failed} failed"
    if outcome.count("MISSING"):
        why = ctx.cut_reason() if not ctx.time_left() else "stopped by --max-failures" if _stopped(ctx) \
            else "interrupted"
        note += f", {outcome.count('MISSING')} not run ({why})"
    if skipped:
        note += "; not re-ranked: " + "; ".join(skipped)
    return {"done": complete == len(plan) and bool(plan), "note": note}


def _raise_on_failure(ctx: StageContext) -> None:
    settings, study, runs = ctx.settings, ctx.study, ctx.runs
    failures = S.failures(study, runs)
    first = min(failures, key=lambda t: t.datetime_start or t.datetime_complete) if failures else None
    where = (f"trial {first.number}" if first is not None and first.user_attrs.get("role") is None
             else f"{first.user_attrs.get('role')} run" if first is not None else "")
    if len(failures) >= settings.max_failures:
        raise SearchFailed(f"the search stopped after {len(failures)} failed trials (--max-failures "
                           f"{settings.max_failures}); first: {where}: {first.user_attrs['error']}")
    if trained_count(study) == 0:
        reason = f"; first error: {where}: {first.user_attrs['error']}" if first is not None else ""
        raise SearchFailed(f"the search trained no candidate{reason}")
    stages = study.user_attrs.get("stages", {})
    for stage, label in (("search", "search"), ("retrain", "re-ranking")):
        status = stages.get(stage, {"done": False, "note": "not run"})
        if not status["done"]:
            raise SearchFailed(f"the {label} stage is incomplete ({status['note']}); `tokennas search --resume "
                               f"{ctx.run_dir}` completes it")
