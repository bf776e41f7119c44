"""Searched against uniform at equal FLOPs, on the test split.

    python benchmarks/bench_searched_vs_baseline.py RUN_DIR [--top 3 --seeds 5 --epochs 8 --subset 3000 --workers 2]
    python benchmarks/bench_searched_vs_baseline.py benchmarks/ground_truth_psvit30M.csv --subset 1000

The top ``--top`` configs of a finished search (``RUN_DIR/best/``, its final ranking; or, given the
ground-truth CSV, the exhaustive search over its table: the best by validation accuracy) and the space's
uniform baseline within the same budget are each trained from scratch with ``--seeds`` seeds, then
scored once on the Fashion-MNIST test split. For each searched config the paired difference (same seed,
same data) to the baseline is reported with a bootstrap 95% confidence interval of its mean; a win is
claimed only when the interval excludes 0. Given the CSV, the table's best uniform ViT (no pooling, no
sharing) is a second reference, so that the difference it shows is the token schedule's, not the shape's.
Runs are appended to ``--out`` as they finish, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402


def run(job: dict) -> dict:
    import torch

    from tokennas.config import config_from_dict
    from tokennas.data import Batches, load_data
    from tokennas.train import TrainSettings, evaluate, fit

    torch.set_num_threads(1)
    config = config_from_dict(job["config"])
    data = load_data(train_subset=job["subset"], img_size=config.img_size, seed=0, with_test=True)
    started = time.perf_counter()
    model, metrics = fit(config, data, TrainSettings(epochs=job["epochs"], seed=job["seed"], device="cpu"))
    test = evaluate(model, Batches(data.test, 256, config.img_size, torch.device("cpu"), shuffle=False,
                                   stats=data.stats))
    return {"name": job["name"], "seed": job["seed"], "flops": job["flops"], "val_acc": metrics["val_acc"],
            "test_acc": test["acc"], "seconds": round(time.perf_counter() - started, 1)}


def bootstrap(diffs: np.ndarray, rounds: int = 10_000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = rng.choice(diffs, size=(rounds, len(diffs)), replace=True).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--subset", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "searched_vs_baseline.csv")
    args = parser.parse_args()

    from tokennas.config import load_config
    from tokennas.flops import count_flops
    from tokennas.search.settings import load_settings
    from tokennas.spaces import Inputs

    references = ["baseline"]  # what the searched configs are compared with
    if args.run_dir.suffix == ".csv":
        import json

        from tokennas.config import config_from_dict
        from tokennas.spaces import get_space

        table = pd.read_csv(args.run_dir)
        hi = table[(table["fidelity"] == "hi") & (table["role"] == "candidate")]
        best = hi.groupby("candidate").agg(val_acc=("val_acc", "mean"), config=("config", "first"))
        best = best.sort_values("val_acc", ascending=False)
        configs = {name: config_from_dict(json.loads(row.config)) for name, row in best.head(args.top).iterrows()}
        first = next(iter(configs.values()))
        configs["baseline"] = get_space("psvit").baseline(30_000_000, Inputs(first.img_size, 1, 10))
        # The table's best uniform ViT (no pooling, no sharing): what a user tuning width and depth by hand
        # would reach, so the difference to it is what the token schedule adds beyond the baseline's shape.
        plain = [name for name, config in ((n, json.loads(c)) for n, c in best["config"].items())
                 if not config["pool_after"] and not config["share_attn"]]
        if plain and plain[0] not in configs:
            references.append(f"uniform-{plain[0]}")
            configs[references[-1]] = config_from_dict(json.loads(best.loc[plain[0]].config))
    else:
        settings = load_settings(args.run_dir)
        searched = sorted((args.run_dir / "best").glob("*.yaml"))[: args.top]
        configs = {path.name.split("-")[1]: load_config(str(path)) for path in searched}
        first = next(iter(configs.values()))
        configs["baseline"] = settings.space_object().baseline(
            settings.budget, Inputs(first.img_size, first.in_chans, first.num_classes))
    done = set()
    if args.out.exists():
        old = pd.read_csv(args.out)
        done = set(zip(old["name"], old["seed"], strict=True))
    jobs = [{"name": name, "seed": seed, "config": config.to_dict(), "flops": count_flops(config),
             "epochs": args.epochs, "subset": args.subset}
            for seed in range(1, args.seeds + 1) for name, config in configs.items() if (name, seed) not in done]
    print(f"{len(jobs)} runs to go on {machine()}, {args.workers} workers", flush=True)
    with mp.get_context("spawn").Pool(args.workers) as workers:
        for row in workers.imap_unordered(run, jobs):
            pd.DataFrame([row]).to_csv(args.out, mode="a", header=not args.out.exists(), index=False)
            print(f"{row['name']} seed {row['seed']}: test {row['test_acc']:.4f} ({row['seconds']:.0f}s)", flush=True)

    results = pd.read_csv(args.out)
    rows = []
    for reference in references:
        ref = results[results["name"] == reference].set_index("seed")["test_acc"]
        for name in [n for n in configs if n not in references]:
            mine = results[results["name"] == name].set_index("seed")["test_acc"]
            seeds = sorted(set(mine.index) & set(ref.index))
            diffs = np.array([mine[s] - ref[s] for s in seeds])
            low, high = bootstrap(diffs)
            rows.append({"config": name, "against": reference,
                         "MACs": int(results[results["name"] == name]["flops"].iloc[0]),
                         "test acc (mean)": mine[seeds].mean(), "reference (mean)": ref[seeds].mean(),
                         "paired diff": diffs.mean(), "95% CI": f"[{low:+.4f}, {high:+.4f}]", "seeds": len(seeds),
                         "win": "yes" if low > 0 else "no (loss)" if high < 0 else "no (interval spans 0)"})
    for reference in references:
        print(f"{reference} MACs: {int(results[results['name'] == reference]['flops'].iloc[0]):,}")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f"))


if __name__ == "__main__":
    main()
