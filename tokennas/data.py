"""Datasets: the embedded Fashion-MNIST (Debian's IDX files), any timm dataset, or an image folder.

A seeded validation split is carved from the training data; the search selects on it alone. The
test split is read only by ``tokennas train``. Fashion-MNIST is small enough to live as one uint8
tensor on the training device, so a batch is an index into it and never waits for a loader.

An image folder (``--dataset folder``) is ``D/train/`` and ``D/validation/``, each with one subfolder per
class (at least 2, the same in both), and optionally ``D/test/`` with the same classes. The search's validation
split is carved from ``train/`` with the seed; the test split of ``tokennas train`` is ``test/`` when it exists,
else ``validation/``. A missing ``train/`` or ``validation/`` is refused, never replaced by the root folder.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
# Without root: the four IDX files in any folder named by $FASHION_MNIST_DIR (or passed as --data-dir).
FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR") or DEBIAN_FASHION_MNIST_DIR)
HOW_TO_GET_FASHION_MNIST = ("as root: apt-get install dataset-fashion-mnist; without root: put the four files "
                            "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                            "t10k-labels-idx1-ubyte.gz from github.com/zalandoresearch/fashion-mnist) in a folder "
                            "and set FASHION_MNIST_DIR=FOLDER or pass --data-dir FOLDER")
FASHION_MNIST_STATS = (0.2860, 0.3530)  # mean, std of the training images
EMBEDDED = "fashion-mnist"
VAL_FRACTION = 0.1  # of the training images, carved by the seed as the validation split
AUGMENTS = ("auto", "light", "imagenet", "none")  # auto: light below 64px, timm's ImageNet policy from 64px
# default: the short recipe tuned for searches; deit: DeiT's augmentation and label smoothing, for long GPU-scale runs
RECIPES = ("default", "deit")


def timm_data_config(dataset: str, img_size: int, in_chans: int = 3) -> dict:
    """The preprocessing a model trained on ``dataset`` expects, as timm's data config.

    ``timm.data.create_transform(**config)`` is the evaluation transform: for image folders and timm datasets it
    is the one ``load_data`` applies; for the embedded Fashion-MNIST (1 channel) it resizes the whole 28px image,
    as ``Batches`` does, and normalises with its statistics. Models carry it as their ``pretrained_cfg``.
    """
    from timm.data.constants import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if dataset == EMBEDDED:
        mean, std, crop_pct = (FASHION_MNIST_STATS[0],), (FASHION_MNIST_STATS[1],), 1.0
    elif in_chans == 3:
        mean, std, crop_pct = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, DEFAULT_CROP_PCT
    else:
        mean, std, crop_pct = (0.5,) * in_chans, (0.5,) * in_chans, DEFAULT_CROP_PCT
    return {"input_size": (len(mean), img_size, img_size), "interpolation": "bilinear", "mean": tuple(mean),
            "std": tuple(std), "crop_pct": crop_pct, "crop_mode": "center"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@dataclasses.dataclass
class TensorSplit:
    """Images as a uint8 tensor (N, C, H, W) and labels (N,), batched by indexing on any device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> TensorSplit:
        return TensorSplit(self.images.to(device), self.labels.to(device))


@dataclasses.dataclass
class DataBundle:
    """Train/validation/test splits plus what they fix about a model (channels, classes)."""

    name: str
    train: object  # TensorSplit or a torch Dataset
    val: object
    test: object | None
    in_chans: int
    num_classes: int
    img_size: int
    stats: tuple[float, float] = FASHION_MNIST_STATS
    data_config: dict | None = None  # timm's data config of a model trained on it (see timm_data_config)


def _split_indices(n: int, val_size: int, train_subset: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    val, train = order[:val_size], order[val_size:]
    if train_subset is not None:  # a quick search also validates on fewer images: half the subset, >= 1000
        train, val = train[:train_subset], val[: max(1000, train_subset // 2)]
    return np.sort(train), np.sort(val)


def trained_split(dataset: str, seed: int | None) -> dict[str, Any]:
    """What a checkpoint records of the data it trained on: the dataset and the seed that carved its validation
    split (None: schedules of different seeds, so that no validation split was held out from all of them)."""
    return {"dataset": dataset, "seed": seed, "val_fraction": VAL_FRACTION}


def check_held_out(trained_on: dict[str, Any] | None, dataset: str, seed: int, what: str) -> None:
    """A ``ValueError`` unless the validation split of ``seed`` holds no image that ``what`` trained on: weights
    that record a validation split of the same dataset (``trained_split``) must have been held out from this one.
    Weights without a record, or trained on another dataset, are taken as they are."""
    if not trained_on or trained_on.get("dataset") != dataset:
        return
    held, fraction = trained_on.get("seed"), trained_on.get("val_fraction", VAL_FRACTION)
    if held == seed and fraction == VAL_FRACTION:
        return
    if held is None or fraction != VAL_FRACTION:
        raise ValueError(f"{what} trained on images of more than one validation split of {dataset!r}, so none is "
                         "held out from it; evaluate it on the test split (--split test)")
    raise ValueError(f"invalid --seed {seed} with {what}: it trained on {dataset!r} outside the validation split of "
                     f"seed {held}, so the validation split of seed {seed} holds images it trained on and its "
                     f"accuracies would not be held out; use --seed {held}")


def load_data(dataset: str = EMBEDDED, data_dir: str | Path | None = None, img_size: int = 32,
              train_subset: int | None = None, val_fraction: float = VAL_FRACTION, seed: int = 0,
              with_test: bool = False, augment: str = "auto") -> DataBundle:
    """Load ``dataset`` with a seeded validation split; ``train_subset`` keeps the first N training images.

    ``augment`` picks the training augmentation (``AUGMENTS``). The embedded data is augmented on the
    device by ``Batches`` (random shifts of an eighth of the image and horizontal flips) unless it is ``none``.
    """
    if augment not in AUGMENTS:
        raise ValueError(f"invalid --augment {augment!r}; expected one of: {', '.join(AUGMENTS)}")
    if img_size < 8:
        raise ValueError(f"invalid --img-size {img_size}; expected at least 8")
    if train_subset is not None and train_subset < 10:
        raise ValueError(f"invalid --train-subset {train_subset}; expected at least 10 images")
    if not 0 < val_fraction < 1:
        raise ValueError(f"invalid validation fraction {val_fraction}; expected a number between 0 and 1")
    if dataset == EMBEDDED:
        return _fashion_mnist(Path(data_dir) if data_dir else FASHION_MNIST_DIR, img_size, train_subset,
                              val_fraction, seed, with_test)
    return _timm_dataset(dataset, data_dir, img_size, train_subset, val_fraction, seed, with_test, augment)


def train_transform(img_size: int, augment: str, recipe: str = "default"):
    """timm's training transform, fitted to the resolution: below 64px (or ``light``) random crops that keep
    at least half of the image and flips, without colour jitter; from 64px timm's ImageNet policy. The ``deit``
    recipe replaces it with DeiT's (Touvron et al. 2021): RandAugment, random erasing of a quarter of the
    images, bicubic resizing."""
    from timm.data import create_transform

    if recipe == "deit":
        return pillow_safe(create_transform(img_size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                            re_prob=0.25, re_mode="pixel", interpolation="bicubic"))
    if augment == "none":
        return create_transform(img_size, is_training=False, crop_pct=1.0)
    if augment == "light" or (augment == "auto" and img_size < 64):
        return create_transform(img_size, is_training=True, scale=(0.5, 1.0), hflip=0.5, color_jitter=None)
    return create_transform(img_size, is_training=True)


def pillow_safe(transform):
    """``transform`` with its RandAugment's posterize keeping 0 bits as a black image, as Pillow did before 13:
    timm's increasing posterize reaches 0 bits at magnitude 10 (m9-mstd0.5 draws it 2% of the time), which
    Pillow 13 refuses with a ValueError that would stop the training."""
    from timm.data import auto_augment

    for augment in getattr(transform, "transforms", ()):
        if isinstance(augment, auto_augment.RandAugment):
            for op in augment.ops:
                if op.aug_fn is auto_augment.posterize:
                    op.aug_fn = _posterize
    return transform


def _posterize(img, bits_to_keep: int, **kwargs):
    from PIL import Image
    from timm.data.auto_augment import posterize

    return Image.new(img.mode, img.size) if bits_to_keep < 1 else posterize(img, bits_to_keep, **kwargs)


def _fashion_mnist(root: Path, img_size, train_subset, val_fraction, seed, with_test) -> DataBundle:
    def load(prefix: str) -> TensorSplit:
        files = {kind: next(iter(sorted(root.glob(f"{prefix}-{kind}-idx*-ubyte*"))), None)
                 for kind in ("images", "labels")}
        if None in files.values():
            raise ValueError(f"Fashion-MNIST IDX files not found in {str(root)!r}; {HOW_TO_GET_FASHION_MNIST}")
        images = torch.from_numpy(read_idx(files["images"]).copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
        return TensorSplit(images, torch.from_numpy(read_idx(files["labels"]).astype(np.int64)))

    full = load("train")
    train_idx, val_idx = _split_indices(len(full), int(len(full) * val_fraction), train_subset, seed)
    split = lambda idx: TensorSplit(full.images[idx], full.labels[idx])  # noqa: E731
    return DataBundle(EMBEDDED, split(train_idx), split(val_idx), load("t10k") if with_test else None,
                      in_chans=1, num_classes=10, img_size=img_size, data_config=timm_data_config(EMBEDDED, img_size))


FOLDER_NAMES = ("", "folder", "imagefolder")  # an image folder; other names are timm's datasets


def _timm_dataset(name, data_dir, img_size, train_subset, val_fraction, seed, with_test, augment) -> DataBundle:
    """Any timm dataset name (``torch/cifar10``...) or, with an empty name or ``folder``, an image folder."""
    from timm.data import create_transform
    from timm.data.constants import IMAGENET_DEFAULT_MEAN

    if not data_dir:
        raise ValueError(f"dataset {name!r} needs --data-dir; only {EMBEDDED!r} is embedded")
    root = Path(data_dir)
    if not root.exists():
        raise ValueError(f"--data-dir {str(root)!r} does not exist")
    if name in FOLDER_NAMES:
        train_full, val_full, test = _image_folder(name, root, with_test)
    else:
        train_full = _create(name, root, "train", is_training=True)
        test = _create(name, root, "validation") if with_test else None
        val_full = _create(name, root, "train")
    train_full.transform = train_transform(img_size, augment)
    data_config = timm_data_config(name, img_size)
    eval_transform = create_transform(**data_config)  # what resolve_data_config gives for a model trained here
    if test is not None:
        test.transform = eval_transform
    train_idx, val_idx = _split_indices(len(train_full), max(1, int(len(train_full) * val_fraction)),
                                        train_subset, seed)
    val_full.transform = eval_transform
    num_classes = _num_classes(train_full)
    return DataBundle(name, torch.utils.data.Subset(train_full, train_idx.tolist()),
                      torch.utils.data.Subset(val_full, val_idx.tolist()), test, in_chans=3,
                      num_classes=num_classes, img_size=img_size, stats=(IMAGENET_DEFAULT_MEAN[0], 1.0),
                      data_config=data_config)


def _create(name: str, root: Path, split: str, **kwargs):
    """timm's ``create_dataset``; an image folder (``FOLDER_NAMES``) is opened at ``root`` itself."""
    from timm.data import create_dataset

    folder = name in FOLDER_NAMES
    try:
        return create_dataset("" if folder else name, root=str(root), split=split, search_split=not folder,
                              download=False, **kwargs)
    except Exception as err:  # noqa: BLE001  (timm raises many kinds; the user needs the one line)
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot open dataset {name!r} in {str(root)!r}: {first}") from None


def _image_folder(name: str, root: Path, with_test: bool):
    """An image folder's training images (twice: augmented, and for the validation split carved from them) and
    its test split (``test/``, else ``validation/``). ``train/`` and ``validation/`` must exist with the same
    classes: timm would fall back to the root, and a test on training images would look like generalisation."""
    for split in ("train", "validation"):
        if not (root / split).is_dir():
            raise ValueError(f"image folder {str(root)!r} has no {split}/ folder; expected {split}/ beside "
                             f"{'validation' if split == 'train' else 'train'}/, each with one subfolder per class")
    train = _create(name, root / "train", "train", is_training=True)
    classes = sorted(train.reader.class_to_idx)
    if len(classes) < 2:
        raise ValueError(f"image folder {str(root / 'train')!r} has {len(classes)} class(es); expected at least 2 "
                         "class subfolders")
    held_out = {"validation": _create(name, root / "validation", "validation")}
    if with_test and (root / "test").is_dir():
        held_out["test"] = _create(name, root / "test", "test")
    for split, dataset in held_out.items():
        other = sorted(dataset.reader.class_to_idx)
        if other != classes:
            only_train, only_here = sorted(set(classes) - set(other)), sorted(set(other) - set(classes))
            odd = f"{only_train[0]!r} only in train/" if only_train else f"{only_here[0]!r} only in {split}/"
            raise ValueError(f"image folder {str(root / split)!r} has other classes than train/ ({odd}); expected "
                             "the same class subfolders")
    test = held_out.get("test", held_out["validation"]) if with_test else None
    return train, _create(name, root / "train", "train"), test


def with_transform(split, transform):
    """A dataset split (a ``Subset``) whose images go through ``transform``, the data bundle left as it is; the
    embedded tensors, which no PIL transform applies to, unchanged."""
    if isinstance(split, TensorSplit):
        return split
    dataset = copy.copy(split.dataset)
    dataset.transform = transform
    return torch.utils.data.Subset(dataset, split.indices)


def _num_classes(dataset) -> int:
    reader = getattr(dataset, "reader", None)
    for holder in (reader, dataset, getattr(dataset, "parser", None)):
        for attr in ("class_to_idx", "classes"):
            value = getattr(holder, attr, None)
            if value:
                return len(value)
    raise ValueError("cannot tell the number of classes of this dataset")


def shift_and_flip(images: torch.Tensor) -> torch.Tensor:
    """Per image: a random shift of up to an eighth of the side (zero padding) and a horizontal flip."""
    n, _, h, w = images.shape
    pad = max(1, h // 8)
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=images.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=images.device)
    rows = (dy + torch.arange(h, device=images.device).view(1, h, 1)).expand(n, h, w)
    cols = (dx + torch.arange(w, device=images.device).view(1, 1, w)).expand(n, h, w)
    flip = torch.rand(n, 1, 1, device=images.device) < 0.5
    cols = torch.where(flip, dx + (w - 1 - torch.arange(w, device=images.device)).view(1, 1, w), cols)
    batch = torch.arange(n, device=images.device).view(n, 1, 1).expand(n, h, w)
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)


class Batches:
    """Iterates (images, labels) float batches at ``img_size`` on ``device``, normalised.

    For a ``TensorSplit`` it indexes device-resident tensors; for a Dataset it wraps a DataLoader. ``mix`` maps
    every (images, labels) batch, on the device and normalised, to what the model trains on (the deit recipe's
    random erasing and Mixup/CutMix, see ``train.deit_mixing``).
    """

    def __init__(self, split, batch_size: int, img_size: int, device: torch.device, shuffle: bool,
                 seed: int = 0, stats: tuple[float, float] = FASHION_MNIST_STATS, augment: bool = False,
                 num_workers: int = 0, mix: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None) -> None:
        self.split, self.batch_size, self.img_size, self.device = split, batch_size, img_size, device
        self.shuffle, self.stats, self.augment, self.mix = shuffle, stats, augment, mix
        self.generator = torch.Generator().manual_seed(seed)
        if isinstance(split, TensorSplit):
            self.split = split.to(device)
        else:
            self.loader = torch.utils.data.DataLoader(split, batch_size=batch_size, shuffle=shuffle,
                                                      num_workers=num_workers, generator=self.generator,
                                                      pin_memory=device.type == "cuda", drop_last=shuffle,
                                                      persistent_workers=num_workers > 0)

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.shuffle else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._batches()
        return batches if self.mix is None else (self.mix(images, labels) for images, labels in batches)

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not isinstance(self.split, TensorSplit):
            for images, labels in self.loader:
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            return
        n = len(self.split)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        mean, std = self.stats
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start : start + self.batch_size]
            images = self.split.images[idx].float().div_(255)
            if images.shape[-1] != self.img_size:
                images = F.interpolate(images, size=(self.img_size, self.img_size), mode="bilinear",
                                       align_corners=False)
            if self.augment:
                images = shift_and_flip(images)
            yield (images - mean) / std, self.split.labels[idx]
