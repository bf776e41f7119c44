"""Train and evaluate one config: timm's optimizer factory, cosine schedule with warm-up, label smoothing.

Two recipes (``TrainSettings.recipe``): ``default``, the short one tuned for searches, and ``deit``, DeiT's
augmentation for long GPU-scale runs with timm's pieces (Touvron et al. 2021): RandAugment and random erasing,
Mixup/CutMix into soft targets with label smoothing 0.1, and timm's ``SoftTargetCrossEntropy``.

bf16 autocast on CUDA. ``fit`` calls ``on_epoch(metrics, state)`` after every epoch with a checkpoint
state that ``fit(..., resume=state)`` continues from; the state holds only tensors and plain values,
so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import random_seed

from .config import ModelConfig, build_model, config_from_dict
from .data import RECIPES, Batches, DataBundle, TensorSplit, train_transform, with_transform


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """How one candidate is trained."""

    epochs: int = 5
    batch_size: int = 64  # small models on small data learn more per epoch from more, smaller steps
    augment: str = "auto"  # auto: shifts and flips for small images, timm's ImageNet policy from 64px; or none
    lr: float = 3e-3  # AdamW peak learning rate at batch 128, scaled linearly with the batch size
    weight_decay: float = 0.05
    warmup_epochs: float = 0.3  # linear warm-up, in epochs (fractions allowed), never more than a third of training
    label_smoothing: float = 0.0  # 0.1 (DeiT's) slowed the few-epoch runs a search makes
    opt: str = "adamw"
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    workers: int = 0  # data-loader processes for image folders and timm datasets
    recipe: str = "default"  # deit: DeiT's RandAugment, random erasing, Mixup/CutMix and label smoothing (RECIPES)

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"invalid --recipe {self.recipe!r}; expected one of: {', '.join(RECIPES)}")
        if self.recipe == "deit" and self.batch_size < 2:
            raise ValueError(f"invalid --batch-size {self.batch_size} with --recipe deit; expected at least 2 (Mixup "
                             "pairs the images of a batch)")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


class NonFiniteLoss(RuntimeError):
    """Training diverged: the trial stops at once and is recorded as failed, never as a result."""


def check_compatible(config: ModelConfig, data: DataBundle) -> None:
    """The config must take the data's channels and classes."""
    for field in ("in_chans", "num_classes"):
        if getattr(config, field) != getattr(data, field):
            raise ValueError(f"config `{field}` is {getattr(config, field)} but dataset {data.name!r} has "
                             f"{getattr(data, field)}")


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Batches) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy."""
    model.eval()
    device = batches.device
    correct, loss, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    for images, labels in batches:  # sums stay on the device: no host sync per batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images)
        loss += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(-1) == labels).sum()
        seen += len(labels)
    return {"acc": correct.item() / max(seen, 1), "loss": loss.item() / max(seen, 1)}


def training_batches(data: DataBundle, settings: TrainSettings, img_size: int, device: torch.device) -> Batches:
    """Shuffled, augmented training batches; at least one, or a ``ValueError``. Under the deit recipe, image
    datasets go through DeiT's transform and every batch is mixed into soft targets (``deit_mixing``)."""
    split, mix = data.train, None
    if settings.recipe == "deit":
        split = with_transform(data.train, train_transform(data.img_size, settings.augment, settings.recipe))
        mix = deit_mixing(data.num_classes, device, erase=isinstance(split, TensorSplit))
    train = Batches(split, settings.batch_size, img_size, device, shuffle=True, seed=settings.seed,
                    stats=data.stats, augment=settings.augment != "none", num_workers=settings.workers, mix=mix)
    if len(train) == 0:
        raise ValueError(f"the training split has {len(data.train)} images, fewer than one batch of "
                         f"{settings.batch_size}")
    return train


def deit_mixing(num_classes: int, device: torch.device, erase: bool):
    """DeiT's batch augmentation, timm's pieces on the device: random erasing (``erase``: for the embedded tensors,
    which no PIL transform sees; 0.25, per-pixel noise), then Mixup (alpha 0.8) or CutMix (alpha 1.0) with label
    smoothing 0.1. Returns ``mix(images, labels) -> (images, soft targets (B, num_classes))``."""
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing

    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=num_classes)
    eraser = RandomErasing(probability=0.25, mode="pixel", device=device) if erase else None

    def mix(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(labels) % 2:  # timm's Mixup pairs the batch with its reverse: an odd batch loses its last image
            images, labels = images[:-1], labels[:-1]
        return mixup(eraser(images) if eraser else images, labels)

    return mix


def restore(resume: dict[str, Any] | None, model: torch.nn.Module, optimizer, train: Batches,
            seed: int) -> tuple[int, int]:
    """Load a checkpoint ``state`` (``fit``'s, or a supernet's) into the model and optimizer and move the data order
    to its epoch; returns (epochs done, updates done), (0, 0) without one."""
    if resume is None:
        return 0, 0
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    train.generator.manual_seed(seed + resume["epoch"])
    return resume["epoch"], resume["updates"]


# Losses between two divergence checks: every step on the CPU (no sync cost), every 16 on a GPU (each check syncs).
CHECK_EVERY = {False: 1, True: 16}


def recipe(model: torch.nn.Module, settings: TrainSettings, updates_per_epoch: int):
    """The optimizer (timm's AdamW, learning rate scaled with the batch), the cosine schedule with warm-up
    stepped per update, and the loss: what every training in tokennas uses. The deit recipe's loss takes the soft
    targets of its mixed batches (``training_batches``); its label smoothing is in them."""
    optimizer = create_optimizer_v2(model, opt=settings.opt, lr=settings.lr * settings.batch_size / 128,
                                    weight_decay=settings.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=settings.epochs,
                                       warmup_epochs=min(settings.warmup_epochs, settings.epochs / 3),
                                       step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    if settings.recipe == "deit":
        return optimizer, scheduler, SoftTargetCrossEntropy()
    return optimizer, scheduler, LabelSmoothingCrossEntropy(settings.label_smoothing)


def fit(config: ModelConfig, data: DataBundle, settings: TrainSettings,
        on_epoch: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
        resume: dict[str, Any] | None = None,
        init: dict[str, torch.Tensor] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train ``config`` on ``data.train``, validating on ``data.val`` after every epoch; ``init``: starting
    weights (a supernet's, for fine-tuning) instead of a fresh initialisation."""
    check_compatible(config, data)
    device = settings.resolved_device()
    random_seed(settings.seed)  # torch, and numpy and random, which Mixup, RandAugment and random erasing draw from
    model = build_model(config).to(device)
    train = training_batches(data, settings, config.img_size, device)
    val = Batches(data.val, 2 * settings.batch_size, config.img_size, device, shuffle=False, stats=data.stats,
                  num_workers=settings.workers)
    if init is not None:
        model.load_state_dict(init)
    optimizer, scheduler, criterion = recipe(model, settings, len(train))
    start_epoch, updates = restore(resume, model, optimizer, train, settings.seed)
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, settings.epochs):
        model.train()
        started, total_loss = time.perf_counter(), torch.zeros((), device=device)
        window = []  # recent losses, checked for divergence every few steps (CHECK_EVERY)
        for step, (images, labels) in enumerate(train, start=1):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = criterion(model(images), labels)
            window.append(loss.detach())
            if len(window) >= CHECK_EVERY[device.type == "cuda"] or step == len(train):
                check_finite(torch.stack(window), epoch + 1, step - len(window) + 1)
                window.clear()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(updates)
            total_loss += loss.detach()
        result = evaluate(model, val)
        metrics = {"epoch": epoch + 1, "train_loss": total_loss.item() / len(train), "val_acc": result["acc"],
                   "val_loss": result["loss"], "epoch_seconds": time.perf_counter() - started,
                   "images_per_second": len(train) * settings.batch_size / (time.perf_counter() - started)}
        if on_epoch is not None:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                     "updates": updates, "config": config.to_dict()}
            on_epoch(metrics, state)
    return model, metrics


def check_finite(losses: torch.Tensor, epoch: int, first_step: int) -> None:
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        index = int(bad[0])
        raise NonFiniteLoss(f"loss is {float(losses[index])} at epoch {epoch}, step {first_step + index}")


def save_checkpoint(model: torch.nn.Module, config: ModelConfig, path: Path, **extra: Any) -> Path:
    """Weights plus the config that rebuilds the model, loadable with ``weights_only=True``; written whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda tmp: torch.save({"model": model.state_dict(), "config": config.to_dict(),
                                                      **extra}, tmp))


def write_atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """``write(temporary path)``, then rename it to ``path``: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


TRAIN_OUTPUTS = ("metrics.json", "history.csv", "checkpoint.pt")  # what `tokennas train` writes into --out


def check_folder_path(out: Path) -> Path:
    """An ``--out`` that can be a folder: no existing file on its path. Returns the nearest existing folder."""
    above = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not above.is_dir():
        raise ValueError(f"invalid --out {str(out)!r}: {str(above)!r} is a file; expected a folder path")
    return above


def check_out(out: Path) -> None:
    """``tokennas train --out``: a folder path, made or not, that holds no earlier run's outputs (never replaced)."""
    above = check_folder_path(out)
    if not os.access(above, os.W_OK):
        raise ValueError(f"invalid --out {str(out)!r}: {str(above)!r} is not writable")
    earlier = [name for name in TRAIN_OUTPUTS if (out / name).exists()]
    if earlier:
        raise ValueError(f"--out {str(out)!r} already holds {earlier[0]} from an earlier run; use another --out")


RESUME_STATE = "last.pt"  # `tokennas train`'s state after its last finished epoch, for --resume
RESUME_DEFAULTS = {"recipe": "default"}  # options added since runs were saved: what an older run was started with


def load_resume_state(out: Path, config: ModelConfig, options: dict[str, Any]) -> dict[str, Any]:
    """The state a killed ``tokennas train`` left in ``out``, checked against the config and options asked for."""
    path = out / RESUME_STATE
    if not path.is_file():
        raise ValueError(f"invalid --resume: {str(path)!r} does not exist; nothing to continue in --out {str(out)!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if config_from_dict(state["config"]).to_dict() != config.to_dict():  # read again: fields added since have defaults
        raise ValueError(f"invalid --resume: the run in {str(out)!r} trains another config; pass the same config")
    for name, value in options.items():
        started = state["options"].get(name, RESUME_DEFAULTS.get(name))  # a newer option: its default then
        if started != value:
            flag = f"--{name.replace('_', '-')}"
            raise ValueError(f"invalid --resume with {flag} {value}: the run in {str(out)!r} was started with "
                             f"{flag} {started}; pass the same options")
    return state


def initial_weights(path: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """``tokennas train --init``: the weights of a ``tokennas train`` checkpoint of the same config."""
    if not Path(path).is_file():
        raise ValueError(f"invalid --init {str(path)!r}: no such file; expected a `tokennas train` checkpoint.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (pickle, zip and format errors alike)
        raise ValueError(f"invalid --init {str(path)!r}: not a PyTorch checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"invalid --init {str(path)!r}: not a `tokennas train` checkpoint (no model and config)")
    if config_from_dict(state["config"]).to_dict() != config.to_dict():
        raise ValueError(f"invalid --init {str(path)!r}: its weights are of another config; pass the config it was "
                         "trained with")
    return state["model"]


def trained_on(path: str | Path) -> dict[str, Any] | None:
    """The data a ``tokennas train`` checkpoint records it trained on (``data.trained_split``), if it does."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (not a checkpoint: --init's own check names the problem in one line)
        return None
    return state.get("split") if isinstance(state, dict) else None


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, ModelConfig]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    config = config_from_dict(state["config"])
    model = build_model(config)
    model.load_state_dict(state["model"])
    return model, config
