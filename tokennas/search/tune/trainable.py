"""The Ray side of a stage: the function trainables every trial runs, and one stage run as a Ray Tune experiment.

A trial reports once per epoch with a checkpoint and resumes from Ray's last checkpoint (a retried trial) or from
the interrupted trial it replaces (``resume_from``). A candidate's own failure (an exception, a non-finite loss) is
reported as its last result, not raised: Ray's ``FailureConfig`` retries a raised error, and only a lost node
deserves a retry.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from ...data import DataBundle
from ...train import TrainSettings
from ..stages import StageContext
from ..studies.storage import Heartbeat
from . import cluster
from .searcher import RunsSearcher, TrialEvents, error_line


def log_to(path: Path) -> None:
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

    torch.set_num_threads(max(1, int(params["cpus"])))
    share = params.get("gpus", 0)
    if 0 < share < 1 and torch.cuda.is_available():  # a fraction of a GPU is also that fraction of its memory:
        torch.cuda.set_per_process_memory_fraction(share)  # a trial too big for it fails alone, not its neighbours
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
        if torch.cuda.is_available():  # the actor is reused: hand the failed trial's cached memory back
            torch.cuda.empty_cache()


def train_candidate(params: dict[str, Any], data: DataBundle) -> None:
    """Ray Tune function trainable: one candidate trained (or, with ``init``, fine-tuned from a supernet's
    weights), one report and checkpoint per epoch, resumable (``run_trial``)."""
    from ...config import config_from_dict
    from ...train import fit

    def train(resume, on_epoch, on_progress) -> None:
        settings = TrainSettings(**{**params["train"], "epochs": params["epochs"],
                                    "seed": params.get("seed", params["train"]["seed"])})
        config = config_from_dict(params["config"])
        init = None
        if params.get("init"):  # one-shot fine-tuning: the candidate's weights inherited from the supernet
            from ...models.supernet import Supernet

            init = Supernet.load(params["init"]).child_state_dict(config)
        fit(config, data, settings, on_epoch, resume, init)

    run_trial(params, train)


def epoch_work(ctx: StageContext) -> float | None:
    """Seconds one epoch takes per MAC of a model on this machine's CPU (the training and validation images at
    the measured training speed of the space's baseline), for the live table's ETA before an epoch is timed; None
    without a baseline."""
    from ...speed import training_macs_per_second

    config, data = ctx.prepared.baseline, ctx.prepared.data
    if config is None:
        return None
    return (3 * len(data.train) + len(data.val)) / training_macs_per_second(config)


def run_stage(ctx: StageContext, stage: str, searcher: RunsSearcher, total: int, scheduler=None, trainable=None,
              pool: list[dict[str, Any]] | None = None, cpus: float | None = None) -> RunsSearcher:
    """Run one stage as a Ray Tune experiment: ``searcher`` hands out its trials (``total`` of them, for the live
    table), ``scheduler`` may stop candidates early (FIFO by default), ``trainable`` trains one (a candidate by
    default); the supernet, a stage's only trial, passes its ``pool`` of configs and a whole node's ``cpus``."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from .progress import LiveTable

    settings = ctx.settings
    gpus = settings.gpus()
    cpus = cpus or settings.cpus_per_trial
    train = {"batch_size": settings.batch_size, "lr": settings.lr, "seed": settings.seed, "augment": settings.augment,
             "recipe": settings.recipe, "device": "cuda" if gpus > 0 else "cpu",
             "workers": max(0, int(settings.cpus_per_trial) - 1)}
    table = LiveTable(searcher, settings, total, stage=stage, enabled=ctx.progress,
                      epoch_work=epoch_work(ctx) if ctx.progress and gpus == 0 and pool is None else None)
    extra = {"pool": pool} if pool is not None else {}  # the supernet's candidates (strategies/oneshot.py)
    trainable = tune.with_resources(tune.with_parameters(trainable or train_candidate, data=ctx.prepared.data,
                                                         **extra), {"cpu": cpus, "gpu": gpus})
    name = f"{stage}-{len(ctx.study.trials)}"
    deadline = ctx.deadline
    tuner = tune.Tuner(
        trainable,
        param_space={"train": train, "cpus": cpus, "gpus": gpus},  # merged into every suggestion
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler or FIFOScheduler(), metric="val_acc", mode="max",
            num_samples=-1, reuse_actors=True,
            time_budget_s=max(1.0, deadline - time.monotonic()) if deadline else None),
        run_config=tune.RunConfig(
            # on shared --ray-storage, drivers and runs must not write into one experiment folder
            name=f"{ctx.run_dir.resolve().name}-{os.getpid()}-{name}" if settings.ray_storage else name,
            storage_path=cluster.storage_path(settings.ray_storage) or str((ctx.run_dir / "ray").resolve()),
            verbose=0, log_to_file=True, callbacks=[table, TrialEvents(searcher)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=2)),  # a lost node: retried from its checkpoint
    )
    with table, Heartbeat(ctx.study, searcher.held_trials):
        tuner.fit()
    searcher.close_pending(ctx.cut_reason())
    return searcher
