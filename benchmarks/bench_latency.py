"""The latency model (``tokennas.latency``) against the measured latency of held-out layers schedules of a parent.

At each batch size the model is built (measured, or read from the cache), then random layers directions, projected
onto 50/65/80% of the parent's MACs, run on the parent's weights and are timed interleaved with the parent (one
forward each per round, the order rotating; medians). The table gives the absolute relative error of the predicted
seconds per forward (median, 90th percentile, share within 10%), the same for the predicted speed-up against the
parent (predicted parent / schedule against measured; a slow spell of the machine between the model's measurement
and the check cancels in it), the rank correlation of predicted and measured latency, and, for comparison, the error
of a MACs-proportional guess (the parent's measured latency times the schedule's share of its MACs). On the CPU the
default counts CPU time on one thread (``--clock cpu --threads 1``), which other processes' load does not stretch;
``--clock wall`` gives latency on a quiet machine.

    python benchmarks/bench_latency.py --parent fmnist-vit --batches 1 256 --schedules 30
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_layers import random_directions  # noqa: E402
from common import interleaved, machine  # noqa: E402

from tokennas import count_flops  # noqa: E402
from tokennas.flops import parse_budget  # noqa: E402
from tokennas.latency import latency_model  # noqa: E402
from tokennas.models.supernet import build_supernet, load_parent, parent_uniform_config  # noqa: E402
from tokennas.spaces import Inputs  # noqa: E402
from tokennas.spaces.layers import LayersSpace  # noqa: E402
from tokennas.speed import forward_step  # noqa: E402

HELD_OUT_SEED = 1000  # directions drawn from seeds the search benchmarks (seed 0) do not use


def schedules(trunk: dict, shares: list[float], n: int, seed: int) -> list[tuple[float, object]]:
    """``n`` random layers directions, spread over ``shares`` in turn, each projected onto its share of the parent's
    MACs."""
    space = LayersSpace(trunk=trunk)
    inputs = Inputs(trunk["img_size"], trunk["in_chans"], trunk["num_classes"])
    parent_macs = count_flops(space.parent())
    out = []
    for i, params in enumerate(random_directions(n, trunk["depth"], seed)):
        share = shares[i % len(shares)]
        budget = parse_budget(f"{share:g}%", parent_macs)
        out.append((share, LayersSpace(trunk=trunk, budget=budget).build(params, inputs)))
    return out


def errors(predicted: np.ndarray, measured: np.ndarray) -> tuple[float, float, float]:
    """Median and 90th percentile of |predicted / measured - 1|, and the share within 10%."""
    error = np.abs(predicted / measured - 1)
    return float(np.median(error)), float(np.percentile(error, 90)), float(np.mean(error <= 0.10))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [pd.Series(x).rank().to_numpy() for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1]) if len(a) > 1 else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--parent", default="fmnist-vit")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--schedules", type=int, default=30, help="held-out random layers schedules")
    parser.add_argument("--shares", type=float, nargs="+", default=[50, 65, 80], help="percent of the parent's MACs")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--rounds", type=int, default=None, help="check rounds [15 at batch <= 8, else 5]")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall" if cuda else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads() if cuda else 1)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="the latency model's cache [default: a fresh folder, so that the model is measured]")
    parser.add_argument("--verbose", action="store_true", help="one line per schedule as well")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="latency-"))

    config = parent_uniform_config(args.parent)
    parent_weights = load_parent(args.parent, config.img_size, config.in_chans, config.num_classes)
    space = LayersSpace(trunk=parent_weights.trunk.to_dict())
    parent = space.parent()
    net = build_supernet([parent], parent_weights).eval()
    drawn = schedules(space.trunk, args.shares, args.schedules, args.seed)
    parent_macs = count_flops(parent)

    print(f"### Latency model against measured latency, {args.parent}\n")
    print(f"{machine()}, {datetime.date.today().isoformat()}; {args.clock} clock, "
          f"{'bf16 autocast' if cuda else 'float32'}\n")
    shares = ", ".join(f"{s:g}%" for s in args.shares)
    print(f"{len(drawn)} held-out random layers schedules (seed {args.seed}) at {shares} of the parent's MACs, on its "
          "weights; each timed interleaved with the parent, medians.\n")
    rows, lines = [], []
    for batch in args.batches:
        model = latency_model(parent, batch, device=device, clock=args.clock, cache_dir=cache_dir)
        images = torch.randn(batch, parent.in_chans, parent.img_size, parent.img_size, device=device)
        steps = {"parent": forward_step(net.child_model(parent), images)}
        steps.update({f"schedule {i}": forward_step(net.child_model(c), images) for i, (_, c) in enumerate(drawn)})
        rounds = args.rounds or (15 if batch <= 8 else 5)
        timings = interleaved(steps, rounds, clock=args.clock)
        seconds = {name: statistics.median(s) for name, s in timings.seconds.items()}
        measured = np.array([seconds[f"schedule {i}"] for i in range(len(drawn))])
        predicted = np.array([model.predict(c) for _, c in drawn])
        macs_guess = np.array([seconds["parent"] * count_flops(c) / parent_macs for _, c in drawn])
        speedup_measured = seconds["parent"] / measured
        speedup_predicted = model.predict(parent) / predicted
        median, p90, within = errors(predicted, measured)
        speed_median, speed_p90, _ = errors(speedup_predicted, speedup_measured)
        macs_median, _, _ = errors(macs_guess, measured)
        rows.append({
            "batch": batch, "schedules": len(drawn),
            "median abs rel err": f"{median:.1%}", "p90 abs rel err": f"{p90:.1%}", "within 10%": f"{within:.0%}",
            "speed-up err (median, p90)": f"{speed_median:.1%}, {speed_p90:.1%}",
            "rank corr": f"{spearman(predicted, measured):.2f}",
            "MACs-proportional median err": f"{macs_median:.1%}",
            "parent ms (model / check)": f"{model.predict(parent) * 1e3:.2f} / {seconds['parent'] * 1e3:.2f}",
            "model measured in (wall, CPU)": f"{model.measure_seconds:.1f} s, {model.measure_cpu_seconds:.1f} s"
            + (" (read from the cache)" if model.cached else "")})
        for i, (share, c) in enumerate(drawn):
            lines.append({"batch": batch, "schedule": i, "share": f"{share:g}%",
                          "MACs (% parent)": f"{count_flops(c) / parent_macs:.1%}",
                          "measured ms": f"{measured[i] * 1e3:.3f}", "predicted ms": f"{predicted[i] * 1e3:.3f}",
                          "error": f"{predicted[i] / measured[i] - 1:+.1%}",
                          "speed-up measured / predicted": f"{speedup_measured[i]:.2f} / {speedup_predicted[i]:.2f}"})
    print(pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True))
    if args.verbose:
        print()
        print(pd.DataFrame(lines).to_markdown(index=False, disable_numparse=True))


if __name__ == "__main__":
    main()
