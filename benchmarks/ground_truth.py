"""Build the ground-truth table the validity benchmark replays searches against (run once, commit the CSV).

    python benchmarks/ground_truth.py [--subset 1000 --epochs-lo 2 --epochs-hi 8 --seeds 2 --workers 2]
    python benchmarks/ground_truth.py --recipe old --seeds 1   # the rank fidelity before tuning

Every distinct config of a complete psvit sub-grid under 30M MACs at 32px (68 of its 144 points: width
64-192, depth 4-8, 2 or 4 heads, no, early or two-stage max pooling, no or alternate attention sharing), plus the
space's uniform baseline, is trained with tokennas' default recipe on a fixed Fashion-MNIST split:
- at the high fidelity (``--epochs-hi`` epochs) with ``--seeds`` seeds, keeping the per-epoch validation
  curve (what a replayed ASHA sees);
- at the low fidelity (``--epochs-lo`` epochs, a search's), seed 0, for the rank correlation.
Rows are appended as runs finish, so an interrupted build resumes where it stopped. A GPU runs the
same script at a larger scale (``--subset 54000 --img-size 112``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

DIMENSIONS = {"embed_dim": (64, 96, 128, 192), "depth": (4, 6, 8), "num_heads": (2, 4),
              "pool_schedule": ("none", "early", "two-stage"), "attn_sharing": ("none", "alternate")}
BUDGET = 30_000_000
COLUMNS = ["candidate", "role", "fidelity", "seed", "epochs", "subset", "img_size", "flops", "n_params", "val_acc",
           "curve", "seconds", "params", "config"]


def candidates(img_size: int) -> list[dict]:
    """The sub-space's distinct feasible configs (sorted by key) and the baseline, each with its parameters."""
    from tokennas.config import config_key
    from tokennas.flops import count_flops
    from tokennas.spaces import Inputs, get_space

    space, inputs = get_space("psvit"), Inputs(img_size, 1, 10)
    found = {}
    for values in itertools.product(*DIMENSIONS.values()):
        params = {**dict(zip(DIMENSIONS, values, strict=True)), "pool_kind": "max2d"}
        config = space.build(params, inputs)
        if count_flops(config) <= BUDGET * (img_size / 32) ** 2:
            found.setdefault(config_key(config.to_dict()), (params, config))
    rows = [{"candidate": f"c{i:02d}", "role": "candidate", "params": params, "config": config}
            for i, (_, (params, config)) in enumerate(sorted(found.items()))]
    baseline = space.baseline(int(BUDGET * (img_size / 32) ** 2), inputs)
    return rows + [{"candidate": "baseline", "role": "baseline", "params": {}, "config": baseline}]


# The recipe before issue 9's tuning: AdamW 1e-3 at batch 128, a one-epoch warm-up, label smoothing 0.1,
# horizontal flips only (weight decay 0.05 in both). Kept here to measure the rank fidelity it gave.
OLD_RECIPE = {"lr": 1e-3, "batch_size": 128, "warmup_epochs": 1.0, "label_smoothing": 0.1}


def flips_only(images):
    import torch

    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip.view(-1, *[1] * (images.dim() - 1)), images.flip(-1), images)


def run(job: dict) -> dict:
    import torch

    import tokennas.data
    from tokennas.data import load_data
    from tokennas.flops import count_flops
    from tokennas.train import TrainSettings, fit

    torch.set_num_threads(1)
    recipe = {}
    if job.get("recipe") == "old":
        recipe = OLD_RECIPE
        tokennas.data.shift_and_flip = flips_only  # the embedded data's on-device augmentation, as it was
    data = load_data(train_subset=job["subset"], img_size=job["img_size"], seed=0)
    curve: list[float] = []
    started = time.perf_counter()
    fit(job["config"], data, TrainSettings(epochs=job["epochs"], seed=job["seed"], device="auto", **recipe),
        lambda metrics, state: curve.append(round(metrics["val_acc"], 5)))
    return {"candidate": job["candidate"], "role": job["role"], "fidelity": job["fidelity"], "seed": job["seed"],
            "epochs": job["epochs"], "subset": job["subset"], "img_size": job["img_size"],
            "flops": count_flops(job["config"]), "n_params": job["config"].num_params(), "val_acc": curve[-1],
            "curve": json.dumps(curve), "seconds": round(time.perf_counter() - started, 1),
            "params": json.dumps(job["params"], sort_keys=True), "config": json.dumps(job["config"].to_dict())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", type=int, default=1000)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--epochs-lo", type=int, default=2)
    parser.add_argument("--epochs-hi", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--recipe", choices=("tuned", "old"), default="tuned",
                        help="tuned: tokennas' defaults; old: the recipe before tuning (OLD_RECIPE)")
    parser.add_argument("--sample", type=int, default=None,
                        help="a seeded random sample of this many candidates (the baseline is left out)")
    parser.add_argument("--out", type=Path, default=None,
                        help="[default: benchmarks/ground_truth_psvit30M.csv, or ..._old_recipe.csv]")
    args = parser.parse_args()
    suffix = "_old_recipe" if args.recipe == "old" else ""
    args.out = args.out or Path(__file__).parent / f"ground_truth_psvit30M{suffix}.csv"

    done = set()
    if args.out.exists():
        old = pd.read_csv(args.out)
        done = set(zip(old["candidate"], old["fidelity"], old["seed"], strict=True))
    else:
        pd.DataFrame(columns=COLUMNS).to_csv(args.out, index=False)
    pool = candidates(args.img_size)
    if args.sample:
        import random

        pool = sorted(random.Random(0).sample([c for c in pool if c["role"] == "candidate"], args.sample),
                      key=lambda c: c["candidate"])
    jobs = []
    for seed in range(args.seeds):  # seed by seed, so a partial table is already a complete replay table
        for c in pool:
            jobs.append({**c, "fidelity": "hi", "seed": seed, "epochs": args.epochs_hi})
            if seed == 0:
                jobs.append({**c, "fidelity": "lo", "seed": 0, "epochs": args.epochs_lo})
    jobs = [{**j, "subset": args.subset, "img_size": args.img_size, "recipe": args.recipe} for j in jobs
            if (j["candidate"], j["fidelity"], j["seed"]) not in done]
    print(f"{len(pool)} configs, {len(jobs)} runs to go on {machine()}, {args.workers} workers", flush=True)
    with mp.get_context("spawn").Pool(args.workers) as workers:
        for row in workers.imap_unordered(run, jobs):
            pd.DataFrame([row], columns=COLUMNS).to_csv(args.out, mode="a", header=False, index=False)
            print(f"{row['candidate']} {row['fidelity']} seed {row['seed']}: {row['val_acc']:.4f} "
                  f"({row['seconds']:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
