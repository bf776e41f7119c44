"""Is one-shot scoring worth it? Rank fidelity, compute to match random search, hand-set schedules, speed.

    python benchmarks/bench_oneshot.py fidelity [--supernet-epochs 4 8 --seeds 0 1]
    python benchmarks/bench_oneshot.py schedules --parent CHECKPOINT.pt   # a `tokennas train` uniform ViT
    python benchmarks/bench_oneshot.py scoring-speed

``fidelity``: a supernet over the ground-truth table's psvit candidates (``ground_truth_psvit30M.csv``), trained
on the table's own data (the first 1,000 training images of split seed 0) with tokennas' recipe and the sandwich
rule, then every candidate scored on its inherited weights on the table's 1,000 validation images. Reports Kendall
tau against the stand-alone accuracy (8 epochs, mean over seeds) and the compute the one-shot search needs to
reach random search's median final best (replayed on the table as in ``bench_validity.py``): the supernet's
training, the scoring, then the top candidates by shared-weight score re-trained at the table's fidelity in order
until one reaches it.
Compute is counted in the table's unit, one candidate-epoch (a training pass over the 1,000 images plus a
validation pass), converted by MACs: a supernet epoch costs the MACs of its sandwich, a scoring one forward pass.

``schedules``: on a trained uniform parent, with no fine-tuning, at 50%, 65% and 80% of its MACs: the best schedule
of the ``tokens`` space on the parent's trunk (every feasible schedule scored on validation images, the best by
validation accuracy), against ToMe's constant r, a uniform EViT keep rate at a quarter, half and three quarters
of the depth, and HVT's 1D max pooling at fixed places. Each picks its mildest setting within the MACs. Reports
validation and test accuracy, the paired difference on the test split with a bootstrap 95% interval, and the
measured throughput against the parent at batch 1 and 256 (interleaved, median of paired ratios).

``scoring-speed``: candidates scored per minute at the default ``--score-images`` (2,000) for the ``tokens`` space
under 15M MACs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import format_ratio, interleaved, machine, make_step  # noqa: E402

HERE = Path(__file__).parent


def _configs(table_path: Path):
    from tokennas.config import config_from_dict

    raw = pd.read_csv(table_path)
    raw["curve"] = raw["curve"].map(json.loads)
    hi = raw[(raw["fidelity"] == "hi") & (raw["role"] == "candidate")]
    rows = []
    for candidate, group in hi.groupby("candidate"):
        rows.append({"candidate": candidate, "flops": int(group["flops"].iloc[0]), "hi": group["val_acc"].mean(),
                     "final": float(np.mean(np.stack(group["curve"].to_list()), axis=0)[-1]),
                     "epochs": int(group["epochs"].iloc[0]),
                     "config": config_from_dict(json.loads(group["config"].iloc[0]))})
    return pd.DataFrame(rows)


def random_target(table_path: Path, replays: int) -> tuple[float, int]:
    """Random search's median final best over ``replays`` replays of 20 trained candidates, and the cumulative
    epochs at which the median best-so-far curve reaches it (``bench_validity.py``'s definition)."""
    from bench_validity import Replay, best_at, load_table

    table, _ = load_table(table_path)
    grid = np.arange(1, len(table["curve"].iloc[0]) * 20 + 1)
    runs = np.stack([best_at(Replay(table, "random", seed, 20, 1).run(), grid) for seed in range(replays)])
    target = float(np.nanmedian(runs[:, -1]))
    median = np.nanmedian(runs, axis=0)
    return target, int(grid[np.argmax(median >= target)])


def _score_all(net, configs, batches) -> list[float]:
    from tokennas.search.strategies.oneshot import score

    return [score(net, c, batches) for c in configs]


def fidelity(args) -> None:
    from scipy.stats import kendalltau, spearmanr

    from tokennas.data import load_data
    from tokennas.models.supernet import build_supernet
    from tokennas.search.strategies.oneshot import SANDWICH_RANDOM, fit_supernet, scoring_batches
    from tokennas.train import TrainSettings

    table = _configs(args.table)
    configs = table["config"].tolist()
    target, random_epochs = random_target(args.table, args.replays)
    data = load_data(train_subset=1000, img_size=32, seed=0)
    val = scoring_batches(data, len(data.val), 32, torch.device("cpu"))
    flops = table["flops"].to_numpy(dtype=float)
    mean_flops = flops.mean()
    # one supernet epoch: the sandwich's training passes (3x forward) plus validation of the largest and smallest
    sandwich = flops.max() + flops.min() + SANDWICH_RANDOM * mean_flops
    epoch_units = (3 * sandwich * len(data.train) + (flops.max() + flops.min()) * len(data.val)) / \
        (mean_flops * (3 * len(data.train) + len(data.val)))
    score_units = len(data.val) / (3 * len(data.train) + len(data.val))  # one forward pass over the validation images
    rows, scores = [], []
    print(f"# One-shot rank fidelity ({machine()}, {time.strftime('%Y-%m-%d')})\n")
    print(f"{len(configs)} candidates; one supernet epoch = {epoch_units:.2f} candidate-epochs, one scoring = "
          f"{score_units:.3f}; random search ({args.replays} replays of 20 candidates, bench_validity.py): median "
          f"final best {target:.4f}, reached at {random_epochs} candidate-epochs\n")
    for seed in args.seeds:
        for epochs in args.supernet_epochs:
            torch.manual_seed(seed)
            net = build_supernet(configs)
            started = time.perf_counter()
            fit_supernet(net, configs, data, TrainSettings(epochs=epochs, seed=seed, device="cpu"), len(data.val),
                         distill=args.distill)
            train_s = time.perf_counter() - started
            started = time.perf_counter()
            shared = _score_all(net, configs, val)
            score_s = time.perf_counter() - started
            scores += [{"seed": seed, "supernet_epochs": epochs, "candidate": c, "shared_acc": s, "standalone": h}
                       for c, s, h in zip(table["candidate"], shared, table["hi"], strict=True)]
            order = np.argsort(-np.array(shared), kind="stable")
            spent = epochs * epoch_units + len(configs) * score_units
            best, needed, retrained = -1.0, None, 0
            for index in order:  # re-train the best-scored at the table's fidelity until random's target is reached
                spent += table["epochs"].iloc[index]
                retrained += 1
                best = max(best, table["final"].iloc[index])
                if best >= target:
                    needed = spent
                    break
            rows.append({"seed": seed, "supernet epochs": epochs,
                         "kendall tau": kendalltau(shared, table["hi"]).statistic,
                         "spearman": spearmanr(shared, table["hi"]).statistic,
                         "top-1 by shared score (stand-alone acc)": table["hi"].iloc[order[0]],
                         "re-trained to reach target": retrained, "compute to reach (candidate-epochs)": needed,
                         "vs random": None if needed is None else needed / random_epochs,
                         "supernet training s": train_s, "scoring s": score_s})
            print(pd.DataFrame(rows[-1:]).to_markdown(index=False, floatfmt=".3f"), flush=True)
    frame = pd.DataFrame(scores)
    frame.to_csv(args.out, index=False)
    print("\n## All runs\n" + pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"))
    _plot_fidelity(frame, args.plot)


def _plot_fidelity(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import kendalltau

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for (seed, epochs), part in frame.groupby(["seed", "supernet_epochs"]):
        tau = kendalltau(part["shared_acc"], part["standalone"]).statistic
        ax.scatter(part["shared_acc"], part["standalone"], s=18, alpha=0.7,
                   label=f"supernet {epochs} epochs, seed {seed}: tau {tau:.2f}")
    ax.set_xlabel("accuracy on the supernet's shared weights (no training)")
    ax.set_ylabel("stand-alone accuracy (8 epochs, ground truth)")
    ax.set_title("One-shot rank fidelity: 40 psvit candidates under 30M MACs")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    print(f"\nplot: {path}")


# -- hand-set schedules against the searched one, on a trained uniform parent --
def _mildest(build, knobs, target: int):
    """The first config in ``knobs`` order (mildest first) within ``target`` MACs."""
    for knob in knobs:
        try:
            config = build(knob)
        except ValueError:
            continue
        if sum(config.flops_by_module().values()) <= target:
            return config
    return None


def _tome(trunk, target):
    n = trunk.grid**2
    def build(r):
        keep, tokens = [], n
        for _ in range(trunk.depth):
            tokens = max(1, tokens - min(r, (tokens + 1) // 2))
            keep.append(tokens)
        return trunk.replace(keep_tokens=tuple(keep), reduce_kind="merge")
    return _mildest(build, range(1, n), target)


def _evit(trunk, target):
    n = trunk.grid**2
    places = sorted({min(trunk.depth - 1, round(trunk.depth * f)) for f in (0.25, 0.5, 0.75)})
    def build(rate):
        keep, tokens = [], n
        for b in range(trunk.depth):
            if b in places:
                tokens = max(1, round(tokens * rate))
            keep.append(tokens)
        return trunk.replace(keep_tokens=tuple(keep), reduce_kind="prune")
    return _mildest(build, [r / 100 for r in range(99, 4, -1)], target)


def _hvt(trunk, target):
    from tokennas.spaces.hvt import hvt_positions

    n = trunk.grid**2
    options = []
    for stages in (1, 2, 3, 4):
        for start in range(trunk.depth - 1):
            after = hvt_positions(trunk.depth, start, stages, n)
            if after:
                options.append(trunk.replace(pool_kind="max1d", pool_after=after))
    fitting = [c for c in options if sum(c.flops_by_module().values()) <= target]
    return max(fitting, key=lambda c: sum(c.flops_by_module().values()), default=None)


def schedules(args) -> None:
    from tokennas.config import config_from_dict
    from tokennas.data import Batches, load_data
    from tokennas.models.supernet import build_supernet, load_parent, parent_trunk
    from tokennas.search.strategies.oneshot import scoring_batches
    from tokennas.spaces import Inputs
    from tokennas.spaces.tokens import TokensSpace
    from tokennas.train import evaluate

    state = torch.load(args.parent, map_location="cpu", weights_only=True)
    trunk = config_from_dict(state["config"])
    parent = load_parent(args.parent, trunk.img_size, trunk.in_chans, trunk.num_classes)
    net = build_supernet([trunk], parent).eval()
    data = load_data(train_subset=args.train_subset, img_size=trunk.img_size, seed=0, with_test=True)
    val = scoring_batches(data, len(data.val), trunk.img_size, torch.device("cpu"))
    select = scoring_batches(data, args.score_images, trunk.img_size, torch.device("cpu"))  # what picks the schedule
    test = Batches(data.test, 256, trunk.img_size, torch.device("cpu"), shuffle=False, stats=data.stats)
    full = sum(trunk.flops_by_module().values())
    inputs = Inputs(trunk.img_size, trunk.in_chans, trunk.num_classes)

    def predictions(config) -> np.ndarray:
        model = net.child_model(config).eval()
        out = []
        with torch.no_grad():
            for images, labels in test:
                out.append((model(images).argmax(-1) == labels).numpy())
        return np.concatenate(out)

    print(f"# Searched against hand-set schedules at equal MACs ({machine()}, {time.strftime('%Y-%m-%d')})\n")
    parent_val = evaluate(net.child_model(trunk), val)["acc"]
    parent_test = predictions(trunk)
    print(f"parent: {args.parent}, {full / 1e6:.1f}M MACs, val {parent_val:.4f} on {len(data.val)} images, "
          f"test {parent_test.mean():.4f} on {len(parent_test)} images\n")
    rng = np.random.default_rng(0)
    rows, speeds = [], []
    for fraction in args.fractions:
        target = int(full * fraction)
        space = TokensSpace(budget=target, trunk=parent_trunk(args.parent))
        feasible, _ = space.feasible(target, inputs)
        candidates = [space.build(p, inputs) for p in feasible.values()]
        started = time.perf_counter()
        scored = [(evaluate(net.child_model(c), select)["acc"], i) for i, c in enumerate(candidates)]
        searched = candidates[max(scored)[1]]
        minutes = (time.perf_counter() - started) / 60
        hand = {"searched (tokens space)": searched, "ToMe constant r": _tome(trunk, target),
                "EViT uniform keep rate": _evit(trunk, target), "HVT max1d pooling": _hvt(trunk, target)}
        base = predictions(searched)
        for name, config in hand.items():
            if config is None:
                rows.append({"MACs": f"{fraction:.0%}", "schedule": name, "note": "no setting fits"})
                continue
            correct = base if name.startswith("searched") else predictions(config)
            diff = base.astype(float) - correct
            boot = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(2000)]
            rows.append({"MACs": f"{fraction:.0%}", "schedule": name,
                         "MACs used": sum(config.flops_by_module().values()) / full,
                         "val acc": evaluate(net.child_model(config), val)["acc"], "test acc": correct.mean(),
                         "searched - this (test)": diff.mean(),
                         "95% CI": f"{np.percentile(boot, 2.5):+.4f} to {np.percentile(boot, 97.5):+.4f}",
                         "tokens per block": "/".join(map(str, config.tokens_per_block()["tokens"]))})
        print(f"{fraction:.0%} of the parent's MACs: {len(candidates)} feasible schedules scored in {minutes:.1f} min")
        speeds.append((fraction, searched))
    print("\n" + pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f"))

    print("\n## Measured throughput against the parent (CPU, interleaved, median of paired ratios)\n")
    torch.set_num_threads(args.threads)
    for batch in (1, 256):
        images = torch.randn(batch, trunk.in_chans, trunk.img_size, trunk.img_size)
        steps = {"parent": make_step(net.child_model(trunk), images, train=False)}
        for fraction, config in speeds:
            steps[f"{fraction:.0%}"] = make_step(net.child_model(config), images, train=False)
        rounds = 30 if batch == 1 else 8
        timings = interleaved(steps, rounds)
        for fraction, config in speeds:
            name = f"{fraction:.0%}"
            kind = config.reduce_kind if config.keep_tokens else "pool" if config.pool_after else "none"
            print(f"batch {batch}: searched schedule at {name} of the MACs ({kind}): "
                  f"{format_ratio(timings.speed_ratio(name, 'parent'), rounds)} the parent's speed, "
                  f"{timings.rate(name, batch):,.0f} images/s against {timings.rate('parent', batch):,.0f}")


def scoring_speed(args) -> None:
    from tokennas.data import load_data
    from tokennas.models.supernet import build_supernet
    from tokennas.search.strategies.oneshot import scoring_batches
    from tokennas.spaces import Inputs
    from tokennas.spaces.tokens import TokensSpace

    inputs = Inputs()
    space = TokensSpace(budget=15_000_000)
    configs = [space.build(p, inputs) for p in space.feasible(15_000_000, inputs)[0].values()]
    net = build_supernet(configs).eval()
    data = load_data(seed=0)
    val = scoring_batches(data, args.score_images, 32, torch.device("cpu"))
    sample = random.Random(0).sample(configs, args.candidates)
    _score_all(net, sample[:2], val)  # warm-up
    started = time.perf_counter()
    _score_all(net, sample, val)
    minutes = (time.perf_counter() - started) / 60
    print(f"# Scoring speed ({machine()}, {time.strftime('%Y-%m-%d')})\n")
    print(f"{args.candidates} random feasible tokens-space candidates under 15M MACs, {val.split.images.shape[0]} "
          f"validation images each: {args.candidates / minutes:.1f} candidates per minute "
          f"(mean {np.mean([sum(c.flops_by_module().values()) for c in sample]) / 1e6:.1f}M MACs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fidelity")
    p.add_argument("--table", type=Path, default=HERE / "ground_truth_psvit30M.csv")
    p.add_argument("--supernet-epochs", type=int, nargs="+", default=[4, 8])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--replays", type=int, default=200)
    p.add_argument("--distill", action="store_true", help="BigNAS in-place distillation in the supernet")
    p.add_argument("--out", type=Path, default=HERE / "oneshot_scores.csv")
    p.add_argument("--plot", type=Path, default=HERE / "oneshot_fidelity.png")
    p = sub.add_parser("schedules")
    p.add_argument("--parent", type=Path, required=True)
    p.add_argument("--train-subset", type=int, default=6000, help="the parent's training subset (its val split)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.65, 0.8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--score-images", type=int, default=1000, help="validation images that pick the schedule")
    p = sub.add_parser("scoring-speed")
    p.add_argument("--score-images", type=int, default=2000)
    p.add_argument("--candidates", type=int, default=30)
    args = parser.parse_args()
    {"fidelity": fidelity, "schedules": schedules, "scoring-speed": scoring_speed}[args.command](args)


if __name__ == "__main__":
    main()
