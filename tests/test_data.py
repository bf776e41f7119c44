"""Data: the embedded Fashion-MNIST split, and an image folder through timm's dataset factory."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tokennas.data import Batches, load_data
from tokennas.models.schedule_vit import ScheduleViTConfig
from tokennas.train import TrainSettings, fit


def test_fashion_mnist_split_is_seeded_and_disjoint():
    a = load_data(train_subset=2000, seed=0)
    b = load_data(train_subset=2000, seed=0)
    c = load_data(train_subset=2000, seed=1)
    assert (a.in_chans, a.num_classes, len(a.train), len(a.val)) == (1, 10, 2000, 1000)
    assert torch.equal(a.train.images, b.train.images) and not torch.equal(a.train.images, c.train.images)
    full = load_data(seed=0)
    assert len(full.train) + len(full.val) == 60000 and full.test is None  # the search never loads the test split
    train_rows = {bytes(x.numpy()) for x in a.train.images[:200]}
    assert not train_rows & {bytes(x.numpy()) for x in a.val.images}


def test_batches_are_resized_and_normalised():
    data = load_data(train_subset=256, seed=0)
    images, labels = next(iter(Batches(data.train, 64, 32, torch.device("cpu"), shuffle=True)))
    assert images.shape == (64, 1, 32, 32) and labels.shape == (64,)
    assert abs(images.mean().item()) < 0.5


def test_missing_files_and_bad_options_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="IDX files not found"):
        load_data(data_dir=tmp_path)
    with pytest.raises(ValueError, match="data-dir"):
        load_data("torch/cifar10")
    with pytest.raises(ValueError, match="img-size"):
        load_data(img_size=4)


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("validation", 8)):
        for label, colour in (("dark", 40), ("light", 200)):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count // 2):
                pixels = np.clip(rng.normal(colour, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path


def test_image_folder_through_timm(image_folder):
    data = load_data("folder", image_folder, img_size=16, seed=0, with_test=True)
    assert (data.in_chans, data.num_classes, len(data.train) + len(data.val), len(data.test)) == (3, 2, 24, 8)
    config = ScheduleViTConfig(img_size=16, patch_size=4, in_chans=3, num_classes=2, embed_dim=32, depth=2,
                               num_heads=2)
    _, metrics = fit(config, data, TrainSettings(epochs=1, batch_size=8))
    assert 0.0 <= metrics["val_acc"] <= 1.0


def test_config_must_match_the_data():
    data = load_data(train_subset=100, seed=0)
    config = ScheduleViTConfig(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=32, depth=1,
                               num_heads=2)
    with pytest.raises(ValueError, match="in_chans"):
        fit(config, data, TrainSettings(epochs=1))


def png_folder(root, splits=("train", "validation"), classes=("cat", "dog"), count=4):
    """Tiny PNG image folders: ``root/<split>/<class>/<i>.png``, 16x16."""
    for split in splits:
        for label in classes:
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(folder / f"{i}.png")
    return root


def test_an_image_folder_needs_train_and_validation_never_the_root(tmp_path):
    with pytest.raises(ValueError, match=r"has no validation/ folder") as err:
        load_data("folder", png_folder(tmp_path / "a", splits=("train",)), img_size=16, with_test=True)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"has no train/ folder"):
        load_data("folder", png_folder(tmp_path / "b", splits=("validation",)), img_size=16)


def test_an_image_folder_needs_two_classes_and_the_same_ones_in_every_split(tmp_path):
    with pytest.raises(ValueError, match=r"train' has 1 class\(es\); expected at least 2"):
        load_data("folder", png_folder(tmp_path / "one", classes=("cat",)), img_size=16)
    other = png_folder(tmp_path / "other", splits=("train",))
    png_folder(other, splits=("validation",), classes=("cat", "cow"))
    with pytest.raises(ValueError, match=r"validation' has other classes than train/ \('dog' only in train/\)"):
        load_data("folder", other, img_size=16)


def test_the_test_split_is_test_when_it_exists_else_validation(tmp_path):
    root = png_folder(tmp_path / "d", count=4)
    data = load_data("folder", root, img_size=16, with_test=True)
    assert data.test.reader.root == str(root / "validation") and len(data.test) == 8
    assert len(data.train) + len(data.val) == 8  # the search's validation split is carved from train/
    png_folder(root, splits=("test",), count=2)
    data = load_data("folder", root, img_size=16, with_test=True)
    assert data.test.reader.root == str(root / "test") and len(data.test) == 4
    assert load_data("folder", root, img_size=16).test is None  # the search never opens the test split


@pytest.mark.parametrize("layout", ["only-train", "one-class"])
def test_search_refuses_a_bad_image_folder_in_one_line(tmp_path, layout):
    if layout == "only-train":
        data_dir, needle = png_folder(tmp_path / "data", splits=("train",)), "validation/"
    else:
        data_dir, needle = png_folder(tmp_path / "data", classes=("cat",)), "1 class(es)"
    out = tmp_path / "run"
    # a batch the tiny folder holds, so that only its layout can refuse it; too many --trials, so that a folder
    # wrongly accepted is refused later in one line too instead of starting a search
    result = subprocess.run([sys.executable, "-m", "tokennas.cli", "search", "--space", "psvit", "--flops", "30M",
                             "--dataset", "folder", "--data-dir", str(data_dir), "--batch-size", "2",
                             "--trials", "100000", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and needle in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
