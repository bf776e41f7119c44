"""The deit recipe (DeiT's augmentation with timm's pieces) beside the unchanged default one, and the 224px path
on the embedded data (upsampled) and on an image folder."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import random_seed

from tokennas.cli import main
from tokennas.config import build_model
from tokennas.data import load_data
from tokennas.models.schedule_vit import ScheduleViTConfig
from tokennas.train import RESUME_STATE, TrainSettings, fit, load_resume_state, recipe, training_batches

CPU = torch.device("cpu")
SMALL = ScheduleViTConfig(img_size=32, in_chans=1, num_classes=10, patch_size=8, embed_dim=16, depth=1, num_heads=1)
TINY_224 = dict(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=1)  # seconds on one core


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of 224px JPEGs (dark and light noise): 16 training images, 4 validation images."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("validation", 2)):
        for label, colour in (("dark", 60), ("light", 190)):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(colour, 30, (224, 224, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.jpg")
    return root


def transforms_of(batches) -> list:
    return list(batches.loader.dataset.dataset.transform.transforms)


def test_deit_transform_is_deits_randaugment_random_erasing_and_bicubic(folder):
    data = load_data("folder", folder, img_size=224, seed=0)
    deit = transforms_of(training_batches(data, TrainSettings(recipe="deit", batch_size=4), 224, CPU))
    augment = next(t for t in deit if isinstance(t, RandAugment))
    erasing = next(t for t in deit if isinstance(t, RandomErasing))
    assert len(augment.ops) > 10 and augment.num_layers == 2  # rand-m9-mstd0.5-inc1: 2 ops of timm's increasing set
    assert erasing.probability == 0.25 and erasing.per_pixel
    assert "bicubic" in repr(deit[0]).lower()
    # the bundle keeps its own transform: the default recipe on the same data is untouched
    default = transforms_of(training_batches(data, TrainSettings(batch_size=4), 224, CPU))
    assert not any(isinstance(t, (RandAugment, RandomErasing)) for t in default)
    assert not any(isinstance(t, RandAugment) for t in data.train.dataset.transform.transforms)


def test_deits_posterize_at_its_strongest_is_a_black_image_not_a_pillow_error(folder):
    """timm's increasing posterize keeps 0 bits at magnitude 10, which Pillow 13 refuses; it must not stop a run."""
    data = load_data("folder", folder, img_size=224, seed=0)
    deit = transforms_of(training_batches(data, TrainSettings(recipe="deit", batch_size=4), 224, CPU))
    op = next(op for t in deit if isinstance(t, RandAugment) for op in t.ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    image = Image.fromarray(np.full((224, 224, 3), 200, np.uint8))
    assert np.asarray(op(image)).max() == 0
    op.magnitude = 5  # 4 - int(5 / 10 * 4) = 2 bits kept: 200 -> 192
    assert np.asarray(op(image)).max() == 192


@pytest.fixture(scope="module")
def embedded():
    return load_data(train_subset=64, seed=0)


def test_deit_batches_are_mixed_into_soft_targets(embedded):
    """Every row of the targets sums to 1 with label smoothing 0.1; Mixup/CutMix gives rows with two classes above
    the smoothing floor (0.01), which one-hot labels never have. An odd batch loses its last image."""
    random_seed(0)
    settings = TrainSettings(recipe="deit", batch_size=15)
    images, targets = next(iter(training_batches(embedded, settings, 32, CPU)))
    assert images.shape == (14, 1, 32, 32) and targets.shape == (14, 10)
    assert torch.allclose(targets.sum(1), torch.ones(14))
    assert targets.min() >= 0.01 - 1e-6 and targets.max() < 0.91 + 1e-6
    assert ((targets > 0.011).sum(1) >= 2).any()
    model = build_model(SMALL)
    assert isinstance(recipe(model, settings, 1)[2], SoftTargetCrossEntropy)


def test_default_recipe_is_unchanged(embedded):
    """Hard labels and timm's label-smoothing loss (at 0.0), as before the recipes."""
    settings = TrainSettings(batch_size=16)
    images, labels = next(iter(training_batches(embedded, settings, 32, CPU)))
    assert labels.dtype == torch.int64 and labels.shape == (16,)
    model = build_model(SMALL)
    criterion = recipe(model, settings, 1)[2]
    assert isinstance(criterion, LabelSmoothingCrossEntropy) and criterion.smoothing == 0.0


def test_deit_trains_at_224px_on_an_image_folder(folder):
    data = load_data("folder", folder, img_size=224, seed=0)
    config = ScheduleViTConfig(in_chans=3, num_classes=2, **TINY_224)
    _, metrics = fit(config, data, TrainSettings(epochs=1, batch_size=4, device="cpu", recipe="deit"))
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])


def test_deit_trains_at_224px_on_the_embedded_data_upsampled(embedded):
    batches = training_batches(embedded, TrainSettings(batch_size=16, recipe="deit"), 224, CPU)
    assert next(iter(batches))[0].shape == (16, 1, 224, 224)  # the 28px images, upsampled on the device
    config = ScheduleViTConfig(in_chans=1, num_classes=10, **TINY_224)
    _, metrics = fit(config, embedded, TrainSettings(epochs=1, batch_size=16, device="cpu", recipe="deit"))
    assert math.isfinite(metrics["train_loss"]) and 0 <= metrics["val_acc"] <= 1


def cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    return exit_.value.code, capsys.readouterr().err


def test_a_bad_recipe_exits_2_in_one_line(tmp_path, capsys):
    expected = "error: invalid --recipe 'x'; expected one of: default, deit\n"
    assert cli(capsys, "train", "deit_tiny", "--recipe", "x", "--out", str(tmp_path / "t")) == (2, expected)
    assert cli(capsys, "search", "--space", "psvit", "--flops", "30M", "--recipe", "x", "--out",
               str(tmp_path / "s")) == (2, expected)
    assert not (tmp_path / "t").exists() and not (tmp_path / "s").exists()


def test_resume_checks_the_recipe_and_an_older_run_resumes_as_default(tmp_path):
    options = {"epochs": 2, "seed": 0}
    torch.save({"config": SMALL.to_dict(), "options": options}, tmp_path / RESUME_STATE)  # saved before --recipe
    assert load_resume_state(tmp_path, SMALL, {**options, "recipe": "default"})["options"] == options
    with pytest.raises(ValueError, match="with --recipe deit: .* started with --recipe default; pass the same"):
        load_resume_state(tmp_path, SMALL, {**options, "recipe": "deit"})
