"""Search machinery benchmarks.

    python benchmarks/bench_search.py overhead [--trials 40]
    python benchmarks/bench_search.py efficiency [--trials 12 --epochs 3 --train-subset 3000]

``overhead``: seconds per trial that Ray Tune plus our Optuna searcher add, on a trainable that
reports once and returns. ``efficiency``: TPE with ASHA against random search without early
stopping, same budget, seed and data; best validation accuracy against trials and against
compute, and the hypervolume of the final (accuracy, FLOPs) front.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402


def overhead(trials: int) -> None:
    import ray
    from ray import tune

    from tokennas.search.studies import study as S
    from tokennas.search.tune.searcher import BudgetSearcher
    from tokennas.spaces import Inputs, get_space

    def trivial(params):
        tune.report({"val_acc": 0.5, "epoch": 1})

    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder)
        study = S.open_study(run_dir, "acc", S.make_sampler("tpe", 0, trials), create=True)
        searcher = BudgetSearcher(study, get_space("psvit"), Inputs(), 30_000_000, max_epochs=1, stall=20)
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        tuner = tune.Tuner(tune.with_resources(trivial, {"cpu": 1}), tune_config=tune.TuneConfig(
            search_alg=searcher, metric="val_acc", mode="max", num_samples=trials, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(run_dir / "ray"), verbose=0))
        start = time.perf_counter()
        tuner.fit()
        wall = time.perf_counter() - start
        ray.shutdown()
        suggest = time.perf_counter()
        for i in range(trials):
            searcher.suggest(f"extra{i}")
        suggest = (time.perf_counter() - suggest) / trials
    print(f"machine: {machine()}")
    print(f"overhead: {trials} trivial trials in {wall:.1f}s = {wall / trials:.3f}s per trial (target < 1s); "
          f"of which Optuna ask + FLOPs filter {suggest * 1000:.1f} ms ({searcher.infeasible} proposals over budget)")


def hypervolume(acc: list[float], flops: list[float], budget: float) -> float:
    """Area dominated by (accuracy up, FLOPs down) points, reference (0 accuracy, budget FLOPs), normalised."""
    area, best = 0.0, 0.0
    for f, a in sorted(zip(flops, acc, strict=True)):  # ascending cost: each point adds what it beats so far
        if a > best:
            area += (budget - f) * (a - best)
            best = a
    return area / budget


def efficiency(trials: int, epochs: int, train_subset: int, budget: str, seed: int) -> None:
    import pandas as pd

    from tokennas.flops import parse_flops
    from tokennas.search.run import run_search
    from tokennas.search.settings import SearchSettings

    print(f"machine: {machine()}; psvit under {budget}, {trials} trials, {epochs} epochs, {train_subset} images, "
          f"seed {seed}")
    for sampler, scheduler in (("tpe", "asha"), ("random", "fifo")):
        with tempfile.TemporaryDirectory() as folder:
            settings = SearchSettings(space="psvit", flops=budget, trials=trials, epochs=epochs, sampler=sampler,
                                      scheduler=scheduler, seed=seed, train_subset=train_subset, top=1)
            start = time.perf_counter()
            run_dir = run_search(settings, out=Path(folder) / "run", progress=False)
            wall = time.perf_counter() - start
            frame = pd.read_csv(run_dir / "trials.csv")
        trained = frame[frame["state"].isin(["COMPLETE", "PRUNED"])].sort_values("number")
        best_by_trial = trained["val_acc"].cummax().round(4).tolist()
        compute = trained["seconds"].cumsum().round(0).astype(int).tolist()
        done = trained[trained["state"] == "COMPLETE"]
        hv = hypervolume(done["val_acc"].tolist(), done["flops"].tolist(), parse_flops(budget))
        print(f"{sampler}+{scheduler}: best val_acc {max(best_by_trial):.4f}, wall {wall:.0f}s, "
              f"trial compute {trained['seconds'].sum():.0f}s, {int((trained['state'] == 'PRUNED').sum())} stopped "
              f"early, {int((frame['state'] == 'INFEASIBLE').sum())} over budget, hypervolume {hv:.4f}")
        print(f"  best so far by trial:   {best_by_trial}")
        print(f"  compute so far (s):     {compute}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["overhead", "efficiency"])
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=3000)
    parser.add_argument("--flops", default="30M")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.what == "overhead":
        overhead(args.trials or 40)
    else:
        efficiency(args.trials or 12, args.epochs, args.train_subset, args.flops, args.seed)


if __name__ == "__main__":
    main()
