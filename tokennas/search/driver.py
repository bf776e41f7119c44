"""Run a search: validate everything first, then Optuna + Ray Tune, then re-ranking, then the reports.

Nothing is written before every input has been checked, the study's storage opened and Ray joined
(``--storage``, ``--ray-address``), and the run folder appears whole: its ``search.yaml`` and
``study.db`` are made in a hidden staging folder and renamed into place. The run folder holds
``search.yaml`` (the settings, which ``--resume`` reads; never a password), ``study.db`` (the Optuna
studies, unless ``--storage`` puts them on a server), ``ray/`` (Ray Tune's trial folders and checkpoints,
unless ``--ray-storage``), ``search.log`` (Ray's own output) and the reports.

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
import traceback
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from ..data import DataBundle, load_data
from ..flops import format_flops
from ..spaces import Inputs
from ..train import TrainSettings
from . import cluster
from . import study as S
from .settings import SearchSettings, load_settings, parse_duration, save_settings
from .storage import Heartbeat, check_compatible, is_shared, open_storage, recover_lost_trials, redact


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
    prepared = Prepared(data, inputs, space, feasible)
    if settings.strategy == "oneshot":
        from . import oneshot

        oneshot.check(settings, prepared)
    return prepared


def new_run_dir(settings: SearchSettings, out: Path | None) -> Path:
    run_dir = out or Path("results") / f"{settings.space}-{time.strftime('%Y%m%d-%H%M%S')}"
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
        S.open_study(storage if is_shared(storage) else staging, settings.objective, create=True,
                     study_name=settings.study_name)
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
    stored = load_settings(run_dir)
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

    Raises ``SearchFailed`` (after writing the reports) when the search stopped on failures or trained
    nothing; ``ValueError`` for bad input, before anything is written."""
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
    try:
        cluster.check_data_dir(settings.data_dir if settings.dataset in ("folder", "imagefolder") else None)
        if settings.gpus() > 0 and not cluster.has_gpus():
            raise ValueError(f"invalid --gpus-per-trial {settings.gpus_per_trial}: the Ray cluster has no GPU")
        if resume is not None:
            save_settings(settings, run_dir / "search.yaml")
        else:
            run_dir = create_run(settings, run_dir, storage)
        _log_to(run_dir / "search.log")
        study, runs = _open_studies(settings, storage, resume is not None)
        _stages(settings, prepared, study, runs, run_dir, deadline, progress)
    finally:
        cluster.disconnect()
    _raise_on_failure(settings, study, runs)
    return run_dir


def _open_studies(settings: SearchSettings, storage: Any, resume: bool):
    study = S.open_study(storage, settings.objective, study_name=settings.study_name)
    # a resumed sampler must not replay the draws of the first run, nor drivers started together each other's
    offset = len(study.trials) + (os.getpid() if is_shared(storage) else 0)
    study.sampler = S.make_sampler(settings.sampler, settings.seed + offset, settings.trials)
    if is_shared(storage):  # several drivers may share this study: they must run the same search
        check_compatible(study, dataclasses.asdict(settings), resume)
    recover_lost_trials(study, resume)
    runs = S.open_runs(study)
    recover_lost_trials(runs, resume, enqueue=False)
    return study, runs


def _stages(settings: SearchSettings, prepared: Prepared, study, runs, run_dir: Path, deadline: float | None,
            progress: bool) -> None:
    from .report import write_reports

    try:
        if settings.strategy == "oneshot":
            from . import oneshot

            if _needs_search(settings, study, runs):
                oneshot.search(settings, prepared, study, runs, run_dir, deadline, progress)
        elif _needs_search(settings, study, runs):
            _tune(settings, prepared, study, run_dir, "search", baseline_jobs(settings, prepared, runs), deadline,
                  progress)
        jobs = retrain_jobs(settings, study, runs, prepared, run_dir) if not _stopped(settings, study, runs) else []
        if jobs and (deadline is None or deadline > time.monotonic()):
            _tune(settings, prepared, study, run_dir, "retrain", jobs, deadline, progress)
    except BaseException:
        with contextlib.suppress(Exception):  # what was recorded is reported; the original error goes on
            write_reports(run_dir)
        raise
    write_reports(run_dir)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


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


def retrain_jobs(settings: SearchSettings, study, runs, prepared: Prepared, run_dir: Path) -> list[dict[str, Any]]:
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
    epochs = settings.finetune_epochs or settings.retrain_epochs
    jobs = [_job(role, "retrain", source, seed, config, epochs)
            for seed in retrain_seeds(settings) for role, source, config in sources
            if not _has_run(runs, "retrain", source, seed)]
    if settings.finetune_epochs:  # one-shot: each starts from its weights inherited from the supernet
        from .oneshot import supernet_path

        for job in jobs:
            job["init"] = str(supernet_path(run_dir).resolve())
    return jobs


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
def _log_to(path: Path) -> None:
    """Ray Tune's own messages, and the tracebacks of failed trials, go to the run's ``search.log``."""
    log = logging.FileHandler(path)
    for name in ("ray", "ray.tune", "ray.train", "tokennas"):
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [log], False


def run_trial(params: dict[str, Any], train) -> None:
    """The body of every tokennas Ray Tune function trainable. ``train(resume, on_epoch, on_progress)`` trains;
    ``resume`` is the state of Ray's last checkpoint (a retried trial) or of the interrupted trial this one
    replaces (``params["resume_from"]``); ``on_epoch(metrics, state)`` reports and checkpoints once per epoch;
    ``on_progress(fraction)`` reports progress inside an epoch."""
    import torch
    from ray import tune

    from .searcher import error_line

    torch.set_num_threads(max(1, int(params["cpus"])))
    node = cluster.node_name()  # recorded per trial in trials.csv
    last = {"epoch": 0, "val_acc": 0.0}
    try:
        resume = None
        checkpoint = tune.get_checkpoint()
        if checkpoint is None and params.get("resume_from"):
            checkpoint = tune.Checkpoint(params["resume_from"])
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                resume = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
            last["epoch"] = int(resume.get("epoch", 0))

        def on_epoch(metrics: dict[str, Any], state: dict[str, Any]) -> None:
            last.update(epoch=metrics["epoch"], val_acc=metrics["val_acc"])
            with tempfile.TemporaryDirectory() as folder:
                torch.save(state, Path(folder) / "state.pt")
                tune.report({**metrics, "node": node, "resumed_from_epoch": resume["epoch"] if resume else None},
                            checkpoint=tune.Checkpoint.from_directory(folder))

        def on_progress(fraction: float) -> None:
            tune.report({**last, "epoch_progress": fraction, "node": node})  # Ray wants val_acc in every result

        train(resume, on_epoch, on_progress)
    except Exception as err:  # noqa: BLE001
        # The candidate's own failure (a non-finite loss, a bad config) is reported as its last result, not
        # raised: Ray's FailureConfig would retry a raised error, and only a lost node deserves a retry.
        tune.report({**last, "node": node, "error": error_line(err), "traceback": traceback.format_exc()})


def train_candidate(params: dict[str, Any], data: DataBundle) -> None:
    """Ray Tune function trainable: one candidate trained (or, with ``init``, fine-tuned from a supernet's
    weights), one report and checkpoint per epoch, resumable (``run_trial``)."""
    from ..config import config_from_dict
    from ..train import fit

    def train(resume, on_epoch, on_progress) -> None:
        settings = TrainSettings(**{**params["train"], "epochs": params["epochs"],
                                    "seed": params.get("seed", params["train"]["seed"])})
        config = config_from_dict(params["config"])
        init = None
        if params.get("init"):  # one-shot fine-tuning: the candidate's weights inherited from the supernet
            from ..models.supernet import Supernet

            init = Supernet.load(params["init"]).child_state_dict(config)
        fit(config, data, settings, on_epoch, resume, init)

    run_trial(params, train)


def _tune(settings: SearchSettings, prepared: Prepared, study, run_dir: Path, stage: str, jobs: list[dict[str, Any]],
          deadline: float | None, progress: bool, trainable=None, pool: list[dict[str, Any]] | None = None,
          cpus: float | None = None):
    from ray import tune

    from .progress import LiveTable
    from .schedulers import make_scheduler
    from .searcher import BudgetSearcher, JobSearcher, TrialEvents

    gpus = settings.gpus()
    cpus = cpus or settings.cpus_per_trial  # the supernet, a stage's only trial, takes a whole node's cores
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
        scheduler = make_scheduler("fifo", settings.objective, max(j["epochs_planned"] for j in jobs), 0)
        total = len(jobs)
    table = LiveTable(searcher, settings, total, stage=stage, enabled=progress)
    extra = {"pool": pool} if pool is not None else {}  # the supernet's candidates (oneshot.train_supernet)
    trainable = tune.with_resources(tune.with_parameters(trainable or train_candidate, data=prepared.data, **extra),
                                    {"cpu": cpus, "gpu": gpus})
    name = f"{stage}-{len(study.trials)}"
    tuner = tune.Tuner(
        trainable,
        param_space={"train": train, "cpus": cpus},  # merged into every suggestion
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, metric="val_acc", mode="max", num_samples=-1,
            reuse_actors=True, time_budget_s=max(1.0, deadline - time.monotonic()) if deadline else None),
        run_config=tune.RunConfig(
            # on shared --ray-storage, drivers and runs must not write into one experiment folder
            name=f"{run_dir.resolve().name}-{os.getpid()}-{name}" if settings.ray_storage else name,
            storage_path=cluster.storage_path(settings.ray_storage) or str((run_dir / "ray").resolve()), verbose=0,
            log_to_file=True, callbacks=[table, TrialEvents(searcher)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=2)),  # a lost node: retried from its checkpoint
    )
    with table, Heartbeat(study, searcher.held_trials):
        tuner.fit()
    searcher.close_pending("cut by --time-budget")
    return searcher
