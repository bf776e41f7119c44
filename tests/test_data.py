"""Data: the embedded Fashion-MNIST split, and an image folder through timm's dataset factory."""

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
