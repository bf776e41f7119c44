"""The one-shot strategy (``--strategy oneshot``): candidates are scored on a supernet's shared weights.

1. **Supernet.** Without ``--parent``, or when the parent's classifier does not fit the data, a supernet
   (``models/supernet.py``) is trained as one Ray Tune trial of the runs study (stage ``supernet``) and
   saved as ``RUN/supernet.pt``. Each step trains the sandwich of BigNAS/AutoFormer: the largest and the
   smallest feasible candidate (by MACs) and two random feasible ones, their gradients summed into one
   update. A parent whose classifier fits the data is used as it is (``--supernet-epochs 0``).
2. **Scoring.** Optuna proposes; over-budget proposals and repeats are closed as in the standalone search
   (the same ``BudgetSearcher``, so several drivers can share the study); each feasible candidate is scored
   in-process by its validation accuracy with the inherited weights, on the first ``--score-images`` images
   of the validation split. ``--trials`` counts the candidates scored. The uniform baseline is scored too.
3. **Re-ranking** is the standalone search's stage: the top K and the baseline are trained through Ray
   Tune, from scratch or (``--finetune-epochs``) fine-tuned from their inherited weights.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from ...config import ModelConfig, config_from_dict
from ...data import Batches, DataBundle, TensorSplit, check_held_out
from ...flops import count_flops
from ...models.supernet import Supernet, build_supernet, load_parent
from ...parents import resolve_parent
from ...train import (
    CHECK_EVERY,
    NonFiniteLoss,
    TrainSettings,
    check_compatible,
    check_finite,
    evaluate,
    recipe,
    restore,
    training_batches,
)
from ..settings import SearchSettings
from ..stages import Prepared, StageContext, baseline_jobs, make_job, trained_count
from ..studies.storage import Heartbeat
from ..tune import cluster
from ..tune.searcher import BudgetSearcher, RunsSearcher, error_line
from ..tune.trainable import run_stage, run_trial

DEFAULT_SUPERNET_EPOCHS = 6
SANDWICH_RANDOM = 2  # random candidates per step, beside the largest and the smallest
ONESHOT_SPACES = ("psvit", "hvt", "tokens")  # their candidates are one ViT whose weights slice


def supernet_epochs(settings, head_kept: bool) -> int:
    """``--supernet-epochs``, else 6; 0 for a parent whose classifier fits the data (used as it is)."""
    if settings.supernet_epochs is not None:
        if settings.supernet_epochs == 0 and settings.parent and not head_kept:
            raise ValueError(f"invalid --supernet-epochs 0: the classifier of --parent {settings.parent!r} does not "
                             "fit the data's classes, so the supernet must train at least 1 epoch")
        return settings.supernet_epochs
    return 0 if settings.parent and head_kept else DEFAULT_SUPERNET_EPOCHS


def feasible_configs(prepared) -> list:
    return [prepared.space.build(params, prepared.inputs) for params in prepared.feasible.values()]


# -- the supernet's training, as a Ray Tune function trainable --
def ends(configs: list) -> list:
    """The largest and the smallest candidate by MACs: the fixed part of every step's sandwich."""
    flops = [count_flops(c) for c in configs]
    return [configs[flops.index(max(flops))], configs[flops.index(min(flops))]]


def score(net: Supernet, config, batches: Batches) -> float:
    """Validation accuracy of ``config`` on the supernet's weights (materialised once, not sliced per batch); a
    non-finite loss is a failure, never an accuracy."""
    result = evaluate(net.child_model(config).to(batches.device), batches)
    if not math.isfinite(result["loss"]):
        raise NonFiniteLoss(f"validation loss is {result['loss']} on the supernet's weights")
    return result["acc"]


def fit_supernet(net: Supernet, configs: list, data: DataBundle, settings: TrainSettings, score_images: int,
                 on_epoch=None, resume: dict[str, Any] | None = None, on_step=None,
                 distill: bool = False) -> dict[str, Any]:
    """Train the supernet with the sandwich rule; ``on_epoch(metrics, state)`` after each epoch (the accuracy of
    the largest and the smallest candidate on the scoring images), ``on_step(fraction of the run)``; ``distill``:
    the smaller candidates learn the largest's predictions (BigNAS's in-place distillation) instead of the labels."""
    device = settings.resolved_device()
    torch.manual_seed(settings.seed)
    net = net.to(device)
    train = training_batches(data, settings, net.config.img_size, device)
    val = scoring_batches(data, score_images, net.config.img_size, device, settings.workers)
    optimizer, scheduler, criterion = recipe(net, settings, len(train))
    start_epoch, updates = restore(resume, net, optimizer, train, settings.seed)
    rng = random.Random(settings.seed + start_epoch)
    fixed = ends(configs)
    drawn = min(SANDWICH_RANDOM, len(configs))
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, settings.epochs):
        net.train()
        started, total = time.perf_counter(), torch.zeros((), device=device)
        window = []  # the sandwich's losses since the last divergence check
        for step, (images, labels) in enumerate(train, start=1):
            optimizer.zero_grad(set_to_none=True)
            teacher = None
            for config in fixed + rng.sample(configs, drawn):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = net(images, config)
                    if teacher is None or not distill:
                        loss = criterion(logits, labels)
                    else:  # BigNAS's in-place distillation: the others learn the largest's soft labels
                        loss = torch.nn.functional.kl_div(logits.float().log_softmax(-1), teacher,
                                                          reduction="batchmean")
                    loss = loss / (2 + drawn)
                if teacher is None:
                    teacher = logits.detach().float().softmax(-1)
                loss.backward()
                window.append(loss.detach())
            if len(window) >= CHECK_EVERY[device.type == "cuda"] * (2 + drawn) or step == len(train):
                per_step = torch.stack(window).view(-1, 2 + drawn).sum(1)  # the sandwich's loss, by step
                check_finite(per_step, epoch + 1, step - len(per_step) + 1)  # on the CPU, before this step's update
                total += per_step.sum()
                window.clear()
            optimizer.step()
            updates += 1
            scheduler.step_update(updates)
            if on_step is not None and step % max(1, len(train) // 10) == 0:
                on_step(epoch + step / len(train))
        accs = [score(net, c, val) for c in fixed]
        metrics = {"epoch": epoch + 1, "train_loss": total.item() / len(train), "val_acc": accs[0],
                   "val_acc_smallest": accs[1], "epoch_seconds": time.perf_counter() - started}
        if on_epoch is not None:
            on_epoch(metrics, {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                               "updates": updates, "config": net.config.to_dict(), "supernet": net.spec})
    return metrics


def train_supernet(params: dict[str, Any], data: DataBundle, pool: list[dict[str, Any]]) -> None:
    """Ray Tune function trainable for the supernet: one report and checkpoint per epoch, progress reports inside
    an epoch, resumable (``run_trial``)."""
    def train(resume, on_epoch, on_progress) -> None:
        configs = [config_from_dict(c) for c in pool]
        trunk = config_from_dict(params["config"])
        parent = load_parent(params["parent"], trunk.img_size, trunk.in_chans, trunk.num_classes) \
            if params.get("parent") else None
        net = build_supernet(configs, parent)
        check_compatible(net.config, data)
        settings = TrainSettings(**{**params["train"], "epochs": params["epochs"]})
        fit_supernet(net, configs, data, settings, params["score_images"], on_epoch, resume, on_progress)

    run_trial(params, train)


# -- the strategy --
def scoring_batches(data: DataBundle, images: int, img_size: int, device, workers: int = 0) -> Batches:
    """The first ``images`` images of the validation split, in order: every candidate sees the same ones."""
    val = data.val
    n = min(images, len(val))
    subset = TensorSplit(val.images[:n], val.labels[:n]) if isinstance(val, TensorSplit) else \
        torch.utils.data.Subset(val, range(n))
    return Batches(subset, 256, img_size, device, shuffle=False, stats=data.stats, num_workers=workers)


def check_scoring(settings: SearchSettings) -> None:
    """The options of scoring on given weights: --finetune-epochs, --score-images, and --parent if given."""
    if settings.finetune_epochs < 0:
        raise ValueError(f"invalid --finetune-epochs {settings.finetune_epochs}; expected 0 or more")
    if settings.score_images < 1:
        raise ValueError(f"invalid --score-images {settings.score_images}; expected at least 1")
    if settings.parent is not None:
        resolve_parent(settings.parent)  # a file, or a shipped parent's name


def drop_baseline_unless_held(net: Supernet, prepared: Prepared, why: str) -> None:
    """A baseline ``net`` cannot run is not scored (it would fail on every seed): the summary says ``why``."""
    if prepared.baseline is not None:
        try:
            net.check(prepared.baseline)
        except ValueError as err:
            prepared.baseline_note = f"not evaluated: {why} ({err})"
            prepared.baseline = None


def supernet_path(run_dir: Path) -> Path:
    return run_dir / "supernet.pt"


def parent_weights(settings: SearchSettings, prepared: Prepared):
    """``--parent`` fitted to the data (None without one); refused when it trained on images of the search's
    validation split (``data.check_held_out``: another --seed than its own), whose scores would not be held out."""
    if not settings.parent:
        return None
    inputs = prepared.inputs
    parent = load_parent(settings.parent, inputs.img_size, inputs.in_chans, inputs.num_classes)
    check_held_out(parent.extras.get("split"), prepared.data.name, settings.seed, f"--parent {settings.parent}")
    return parent


class OneShot:
    """``--strategy oneshot``: a supernet trained once (or a ``--parent`` as it is), every candidate scored on its
    shared weights in process; re-ranking trains the top K from scratch or fine-tunes them from those weights."""

    name = "oneshot"
    # scoring costs about a second, so a sampler stuck on repeats (TPE converging on a region whose parameters build
    # a few configs) costs more than the scoring: an untried feasible candidate is scored after 4 misses in a row
    stall = 4
    score_images = SearchSettings.score_images
    evaluated = "scored"
    options = ("parent", "supernet_epochs", "finetune_epochs", "score_images")
    no_retrain = ""  # its re-ranking runs are at least one epoch long (--retrain-epochs >= 1)

    def validate(self, settings: SearchSettings) -> None:
        if settings.space not in ONESHOT_SPACES:
            raise ValueError(f"invalid --space {settings.space!r} for --strategy oneshot; expected one of: "
                             f"{', '.join(ONESHOT_SPACES)} (their candidates are one ViT whose weights slice; "
                             "crossvit, quadtree and stt candidates do not share one trunk)")
        if settings.supernet_epochs is not None and settings.supernet_epochs < 0:
            raise ValueError(f"invalid --supernet-epochs {settings.supernet_epochs}; expected 0 or more")
        check_scoring(settings)


    def check(self, settings: SearchSettings, prepared: Prepared) -> None:
        """The parent loads, fits the data and covers every feasible candidate; a supernet can hold the space. A
        baseline the supernet cannot hold (another patch size, say) is not scored on its weights: it would fail on
        every seed; the summary says why it is missing."""
        parent = parent_weights(settings, prepared)
        supernet_epochs(settings, parent is None or parent.head_kept)
        net = build_supernet(feasible_configs(prepared), parent)  # raises naming what a candidate needs
        drop_baseline_unless_held(net, prepared, "the supernet cannot hold it")

    def search_stage(self, ctx: StageContext) -> None:
        """The supernet (trained once, kept in the run folder), then scoring until ``--trials`` are scored."""
        if not supernet_path(ctx.run_dir).is_file() and not _supernet(ctx):
            return  # failed or cut off: the failure is recorded, --resume continues it
        if ctx.time_left():
            score_stage(ctx, self.stall, self.search_epochs(ctx.settings))

    def unfinished(self, ctx: StageContext) -> str | None:
        return None

    def retrain_start(self, settings: SearchSettings, run_dir: Path, config: ModelConfig) -> dict[str, Any] | None:
        if not settings.finetune_epochs:
            return {}
        try:  # fine-tuning starts from the candidate's weights inherited from the supernet
            Supernet.load(supernet_path(run_dir)).check(config)
        except ValueError:
            return None
        return {"init": str(supernet_path(run_dir).resolve())}

    def search_epochs(self, settings: SearchSettings) -> int:
        return 0  # scored on shared weights, not trained

    def retrain_epochs(self, settings: SearchSettings) -> int:
        return settings.finetune_epochs or settings.retrain_epochs

    def describe(self, settings: SearchSettings, run_dir: Path) -> list[str]:
        path = supernet_path(run_dir)
        if not path.is_file():
            origin = "not built"
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if state.get("epochs"):
                origin = (f"trained {state['epochs']} epochs in this run (sandwich rule)"
                          + (f" from --parent {state['parent']}" if state.get("parent") else " from scratch"))
            else:
                origin = f"--parent {state.get('parent')} as it is"
        start = ("fine-tuned from their inherited weights" if settings.finetune_epochs else "trained from scratch")
        return [f"- strategy: one-shot; candidates scored on the shared weights of supernet.pt ({origin}), on the "
                f"first {settings.score_images} validation images, with no training of their own (`scored` in "
                f"trials.csv); re-ranking runs are {start}"]


def _supernet(ctx: StageContext) -> bool:
    from optuna.trial import TrialState

    settings, prepared, run_dir = ctx.settings, ctx.prepared, ctx.run_dir
    parent = parent_weights(settings, prepared)
    configs = feasible_configs(prepared)
    epochs = supernet_epochs(settings, parent is None or parent.head_kept)
    net = build_supernet(configs, parent)
    if epochs == 0:
        net.save(supernet_path(run_dir), parent=settings.parent, epochs=0)
        return True
    previous = [t for t in ctx.runs.get_trials(deepcopy=False) if t.user_attrs.get("stage") == "supernet"]
    if any("error" in t.user_attrs for t in previous):
        return False  # it failed with an error: reported as such, not trained again
    # a supernet cut by --time-budget or a killed driver goes on from its last checkpoint
    job = make_job("supernet", "supernet", "supernet", settings.seed, net.config, epochs, ctx.runs)
    job["parent"] = str(resolve_parent(settings.parent).resolve()) if settings.parent else None
    job["score_images"] = settings.score_images
    cores = cluster.node_cpus(settings.gpus()) or 0  # the whole of a node that has the trial's GPUs
    run_stage(ctx, "supernet", RunsSearcher(ctx.study, [job], settings.max_failures), 1, trainable=train_supernet,
              pool=[c.to_dict() for c in configs], cpus=max(settings.cpus_per_trial, cores))
    done = [t for t in ctx.runs.get_trials(deepcopy=False) if t.user_attrs.get("stage") == "supernet"
            and t.state == TrialState.COMPLETE and t.user_attrs.get("checkpoint")]
    if not done:
        return False
    state = torch.load(Path(done[-1].user_attrs["checkpoint"]) / "state.pt", map_location="cpu", weights_only=True)
    Supernet.from_state(state).save(supernet_path(run_dir), parent=settings.parent, epochs=epochs)
    return True


def score_stage(ctx: StageContext, stall: int, epochs: int) -> None:
    """Score proposals on the run's supernet.pt until --trials are scored (or the deadline, or the failures); the
    baseline is scored first."""
    from ray.tune.search import Searcher
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    settings, study = ctx.settings, ctx.study
    net = Supernet.load(supernet_path(ctx.run_dir)).eval()
    device = torch.device("cuda" if settings.gpus() > 0 else "cpu")
    net.to(device)
    val = scoring_batches(ctx.prepared.data, settings.score_images, settings.img_size, device)
    jobs = baseline_jobs(ctx, epochs)
    searcher = BudgetSearcher(study, ctx.prepared.space, ctx.prepared.inputs, settings.budget, 0, stall=stall,
                              trials=settings.trials, max_failures=settings.max_failures,
                              feasible=ctx.prepared.feasible, jobs=jobs,
                              seed=settings.proposal_seed + len(study.trials),
                              latency=ctx.prepared.latency, latency_budget_ms=settings.latency,
                              keep_going=ctx.time_left)
    todo = max(0, settings.trials - trained_count(study))
    columns = [TextColumn("scoring on shared weights"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[note]}")]
    best, n = 0.0, 0
    with Progress(*columns, disable=not ctx.progress, transient=False) as bar, \
            Heartbeat(study, searcher.held_trials):
        task = bar.add_task("score", total=todo, note="")
        while ctx.time_left():
            n += 1
            trial_id = f"score-{n}"
            suggestion = searcher.suggest(trial_id)
            if suggestion == Searcher.FINISHED:
                break
            if suggestion is None:  # other drivers of a shared study hold the rest
                time.sleep(0.5)
                continue
            started = time.perf_counter()
            try:
                acc = score(net, config_from_dict(suggestion["config"]), val)
            except Exception as err:  # noqa: BLE001  (a candidate that cannot run is a failed trial)
                searcher.on_trial_complete(trial_id, None, error=True)
                searcher.fail(trial_id, error_line(err))
                continue
            held = searcher.live.get(trial_id) or searcher.jobs_live.get(trial_id, (None,))[0]
            held.set_user_attr("shared", True)
            searcher.on_trial_complete(trial_id, {"val_acc": acc, "epoch": 0,
                                                  "time_total_s": time.perf_counter() - started})
            if suggestion["role"] == "candidate":
                best = max(best, acc)
                bar.update(task, advance=1, note=f"best {best:.4f} · {searcher.infeasible} over budget · "
                                                 f"{searcher.repeats} repeats · {searcher.fallbacks} fallbacks")
