"""Scaling of a search over Ray nodes: trained candidates per hour on one node and on two (1 CPU each).

    python benchmarks/bench_cluster.py [--pairs 2 --trials 4 --epochs 1 --train-subset 1000]

One local Ray cluster (a head without CPUs, where the driver runs, and worker nodes of 1 CPU each), measured
in one run: the same search (same seed, so the same candidates) on one worker node, then with a second worker
node added, interleaved pair by pair (1, 2, 2, 1, ...). No re-ranking; the search's baseline run is part of the
work in both. Throughput is trained candidates over the Tune phase,
from the first trial's start to the last trial's end as the Optuna study records them, so that process start,
data loading and reports (which do not scale with nodes) are left out. The median of the paired ratios is
reported.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import machine  # noqa: E402
from servers import ray_cluster  # noqa: E402


def candidates_per_hour(address: str, run_dir: Path, args: argparse.Namespace) -> tuple[float, int, float]:
    import optuna

    from tokennas.search.studies import study as S

    subprocess.run([sys.executable, "-m", "tokennas.cli", "search", "--space", "psvit", "--flops", "30M",
                    "--trials", str(args.trials), "--epochs", str(args.epochs),
                    "--train-subset", str(args.train_subset),
                    "--scheduler", "fifo", "--retrain-top", "0", "--seed", "0", "--quiet", "--ray-address", address,
                    "--out", str(run_dir)],
                   check=True, capture_output=True)
    study = optuna.load_study(storage=f"sqlite:///{run_dir / 'study.db'}", study_name=S.STUDY_NAME)
    trained = [t for t in study.trials if S.trained(t)]
    start = min(t.datetime_start for t in trained)
    end = max(t.datetime_complete for t in trained)
    seconds = (end - start).total_seconds()
    return len(trained) * 3600 / seconds, len(trained), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-subset", type=int, default=1000)
    args = parser.parse_args()
    node = {"num_cpus": 1, "include_dashboard": False, "object_store_memory": 200 * 1024 * 1024}
    print(f"machine: {machine()}; date {datetime.date.today()}")
    print(f"search: psvit under 30M, {args.trials} candidates x {args.epochs} epoch(s) on {args.train_subset} "
          "images, fifo, seed 0")
    ratios = []
    with ray_cluster(workers=1) as cluster, tempfile.TemporaryDirectory() as folder:
        second = None
        order = [n for i in range(args.pairs) for n in ((1, 2) if i % 2 == 0 else (2, 1))]
        rates: dict[int, list[float]] = {1: [], 2: []}
        for i, nodes in enumerate(order):
            if nodes == 2 and second is None:
                second = cluster.add_node(**node)
                cluster.wait_for_nodes()
            if nodes == 1 and second is not None:
                cluster.remove_node(second)
                second = None
            rate, trained, seconds = candidates_per_hour(cluster.address, Path(folder) / f"run{i}", args)
            rates[nodes].append(rate)
            print(f"  {nodes} node(s): {trained} trained in {seconds:.1f} s = {rate:.0f} candidates/hour")
            if len(rates[1]) == len(rates[2]) == len(ratios) + 1:
                ratios.append(rates[2][-1] / rates[1][-1])
    print(f"candidates/hour, 1 node: {statistics.median(rates[1]):.0f}, 2 nodes: {statistics.median(rates[2]):.0f}; "
          f"paired ratios {', '.join(f'{r:.2f}x' for r in ratios)}; median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
