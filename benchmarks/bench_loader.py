"""Training-loader throughput on a generated 224px JPEG image folder: tokennas's against timm's ``create_loader``.

tokennas's loader is what ``tokennas train`` and the search train on for an image folder: ``load_data("folder", ROOT,
224)`` and the training ``Batches`` (timm's training transform of the ``--recipe``, W worker processes). timm's is
``create_loader`` on the same ``train/`` folder with the same transform settings, batch size and workers (its
prefetcher normalises in the main process). Both are warmed up, then timed one epoch each, in turn
(``common.interleaved``); the ratio is the median of the per-round ratios of images per second (tokennas/timm).
Mixup is not part of either loader (timm applies it after its loader too).

    .venv/bin/python benchmarks/bench_loader.py --images 1000 --workers 1 2 --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import format_ratio, interleaved, machine  # noqa: E402

from tokennas.data import Batches, load_data, pillow_safe, train_transform, with_transform  # noqa: E402

CLASSES = 10
# create_loader's arguments that give each recipe's transform (train_transform's): the ImageNet policy, or DeiT's
TIMM_SETTINGS = {"default": {}, "deit": dict(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel",
                                             interpolation="bicubic")}


def make_folder(root: Path, images: int, img: int = 224, val_per_class: int = 2, classes: int = CLASSES,
                seed: int = 0) -> Path:
    """``images`` JPEGs of ``img`` px in ``classes`` classes under train/ (noisy colour gradients),
    ``val_per_class`` per class in validation/."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, img, dtype=np.float32)
    for split, count in (("train", images // classes), ("validation", val_per_class)):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                colour = rng.uniform(0, 255, (1, 1, 3))
                gradient = colour * (ramp[:, None, None] if i % 2 else ramp[None, :, None])
                pixels = np.clip(gradient + rng.normal(0, 40, (img, img, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def epoch(loader, seen: list[int]):
    def step() -> None:
        seen[0] = sum(len(labels) for _, labels in loader)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="the image folder; made when it has no train/ [default: a temp dir]")
    parser.add_argument("--images", type=int, default=1000, help="training images to generate")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader processes, one run each")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--recipe", choices=tuple(TIMM_SETTINGS), default="default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    from timm.data import create_dataset, create_loader

    root = args.root or Path(tempfile.mkdtemp(prefix="bench_loader_"))
    if not (root / "train").is_dir():
        make_folder(root, args.images)
    device = torch.device(args.device)
    data = load_data("folder", root, 224, seed=0)
    split = with_transform(data.train, train_transform(224, "auto", args.recipe))
    print(f"{machine()}; {len(split)} of {args.images} images (the rest is the validation split) against all "
          f"{args.images} for timm; 224px JPEG, batch {args.batch_size}, recipe {args.recipe}, device {device}")
    for workers in args.workers:
        ours = Batches(split, args.batch_size, 224, device, shuffle=True, num_workers=workers)
        timm_loader = create_loader(create_dataset("", root=str(root / "train"), split="train", is_training=True),
                                    224, args.batch_size, is_training=True, num_workers=workers, device=device,
                                    pin_memory=device.type == "cuda", **TIMM_SETTINGS[args.recipe])
        pillow_safe(timm_loader.dataset.transform)  # the same fix as tokennas's (workers start at the first epoch)
        seen = {"tokennas": [0], "timm": [0]}
        timings = interleaved({"tokennas": epoch(ours, seen["tokennas"]), "timm": epoch(timm_loader, seen["timm"])},
                              rounds=args.rounds, warmup=args.warmup)
        scale = seen["tokennas"][0] / seen["timm"][0]  # images per epoch differ: the ratio is of images per second
        median, low, high = (scale * r for r in timings.speed_ratio("tokennas", "timm"))
        rates = {name: timings.rate(name, seen[name][0]) for name in seen}
        print(f"workers {workers}: tokennas {rates['tokennas']:.1f} img/s, timm create_loader {rates['timm']:.1f} "
              f"img/s, tokennas/timm {format_ratio((median, low, high), args.rounds)}")


if __name__ == "__main__":
    main()
