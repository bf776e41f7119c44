"""Run a search: validate everything first, then Optuna + Ray Tune, then the reports.

Nothing is written before every input has been checked. The run folder holds ``search.yaml`` (the
settings, which ``--resume`` reads), ``study.db`` (the Optuna study), ``ray/`` (Ray Tune's trial
folders and checkpoints), ``search.log`` (Ray's own output) and the reports.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from ..data import DataBundle, load_data
from ..flops import format_flops
from ..spaces import Inputs, get_space
from . import cluster
from . import study as S
from .settings import SearchSettings, load_settings, parse_duration
from .storage import Heartbeat, check_compatible, is_shared, open_storage, recover_lost_trials, redact


def prepare(settings: SearchSettings) -> tuple[DataBundle, Inputs]:
    """Check every input and load the data; raises ValueError before anything is written."""
    settings.validate()
    data = load_data(settings.dataset, settings.data_dir, settings.img_size, settings.train_subset,
                     seed=settings.seed)
    inputs = Inputs(settings.img_size, data.in_chans, data.num_classes)
    smallest = get_space(settings.space).min_flops(inputs)
    if smallest > settings.budget:
        raise ValueError(f"no {settings.space} candidate fits --flops {settings.flops}: the smallest reaches "
                         f"{format_flops(smallest)} ({smallest:,} MACs) at {settings.img_size}px")
    return data, inputs


def run_search(settings: SearchSettings, out: Path | None = None, resume: Path | None = None,
               progress: bool = True) -> Path:
    """Run (or resume) a search and write its reports; returns the run folder."""
    if resume is not None:
        run_dir = resume
        settings = load_settings(run_dir)
        data, inputs = prepare(settings)
    else:
        data, inputs = prepare(settings)
        run_dir = out or Path("results") / f"{settings.space}-{time.strftime('%Y%m%d-%H%M%S')}"
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ValueError(f"--out {str(run_dir)!r} already holds files; use --resume {run_dir} or another --out")
    # issue 11: the study's storage and Ray are joined (and the data folder checked on every node) before
    # anything is written; the password stays in the storage object, never in the settings
    storage = open_storage(settings.storage, run_dir, settings.heartbeat)
    settings = dataclasses.replace(settings, storage=redact(settings.storage))
    cluster.connect(settings.ray_address, _gpu_count())
    try:
        cluster.check_data_dir(settings.data_dir if settings.dataset in ("folder", "imagefolder") else None)
        if resume is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "search.yaml").write_text(yaml.safe_dump(dataclasses.asdict(settings), sort_keys=False))
        _search(settings, storage, data, inputs, run_dir, resume is not None, progress)
    finally:
        cluster.disconnect()

    from .report import write_reports

    write_reports(run_dir)
    return run_dir


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _search(settings: SearchSettings, storage, data: DataBundle, inputs: Inputs, run_dir: Path, resume: bool,
            progress: bool) -> None:
    if resume:
        study = S.open_study(storage, settings.objective, study_name=settings.study_name)
        # a resumed sampler must not replay the draws of the first run
        study.sampler = S.make_sampler(settings.sampler, settings.seed + len(study.trials), settings.trials)
    else:
        study = S.open_study(storage, settings.objective, S.make_sampler(settings.sampler, settings.seed,
                                                                         settings.trials),
                             create=True, study_name=settings.study_name)
    if is_shared(storage):  # issue 11: several drivers may share this study
        check_compatible(study, dataclasses.asdict(settings))
        # drivers started together must not replay one another's draws (the repeat check would catch it)
        study.sampler = S.make_sampler(settings.sampler, settings.seed + len(study.trials) + os.getpid(),
                                       settings.trials)
    recover_lost_trials(study, resume)
    remaining = settings.trials - sum(S.trained(t) for t in study.trials)
    if remaining > 0:
        _tune(settings, study, data, inputs, run_dir, remaining, progress)


def train_candidate(params: dict[str, Any], data: DataBundle) -> None:
    """Ray Tune function trainable: one candidate, one report and checkpoint per epoch, resumable."""
    import torch
    from ray import tune

    from ..config import config_from_dict
    from ..train import TrainSettings, fit

    torch.set_num_threads(max(1, int(params["cpus"])))
    resume = None
    node = cluster.node_name()  # issue 11: recorded per trial in trials.csv
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)

    def on_epoch(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state, Path(folder) / "state.pt")
            tune.report({**metrics, "node": node, "resumed_from_epoch": resume["epoch"] if resume else None},
                        checkpoint=tune.Checkpoint.from_directory(folder))

    fit(config_from_dict(params["config"]), data, TrainSettings(**params["train"]), on_epoch, resume)


def _tune(settings: SearchSettings, study, data: DataBundle, inputs: Inputs, run_dir: Path, remaining: int,
          progress: bool) -> None:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from .progress import LiveTable
    from .searcher import BudgetSearcher

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    log = logging.FileHandler(run_dir / "search.log")
    for name in ("ray", "ray.tune", "ray.train"):
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [log], False
    gpus = settings.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if cluster.has_gpus() else 0.0
    if gpus > 0 and not cluster.has_gpus():  # issue 11: the cluster's GPUs, not only this machine's
        raise ValueError(f"--gpus-per-trial {gpus} asks for a GPU but CUDA is not available")
    train = {"epochs": settings.epochs, "batch_size": settings.batch_size, "lr": settings.lr, "seed": settings.seed,
             "device": "cuda" if gpus > 0 else "cpu"}
    searcher = BudgetSearcher(study, get_space(settings.space), inputs, settings.budget, settings.epochs,
                              target=settings.trials)  # issue 11: the study counts, over every driver
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=settings.epochs,
                               grace_period=max(1, settings.epochs // 4), reduction_factor=3)
                 if settings.scheduler == "asha" else FIFOScheduler())
    table = LiveTable(searcher, settings, remaining, enabled=progress)
    trainable = tune.with_resources(tune.with_parameters(train_candidate, data=data),
                                    {"cpu": settings.cpus_per_trial, "gpu": gpus})
    tuner = tune.Tuner(
        trainable,
        param_space={"train": train, "cpus": settings.cpus_per_trial},  # merged into every suggestion
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler,
            metric="val_acc", mode="max", num_samples=-1, reuse_actors=True,  # the searcher says when to stop
            time_budget_s=parse_duration(settings.time_budget) if settings.time_budget else None),
        run_config=tune.RunConfig(
            name=f"{run_dir.resolve().name}-tune-{len(study.trials)}" if settings.ray_storage else
            f"tune-{len(study.trials)}",
            storage_path=cluster.storage_path(settings.ray_storage) or str((run_dir / "ray").resolve()), verbose=0,
            log_to_file=True, callbacks=[table], checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=2)),  # a lost node: retried from its checkpoint
    )
    with table, Heartbeat(study, lambda: list(searcher.live.values())):
        results = tuner.fit()
    last = {r.metrics.get("trial_id"): r.metrics for r in results if r.metrics}
    searcher.close_pending(last)

