"""Is the search worth its compute? Figures from the committed ground-truth table, no training.

    python benchmarks/bench_validity.py [--table benchmarks/ground_truth_psvit30M.csv --replays 200 --budget 20]
    python benchmarks/bench_validity.py --first-seed 200 --plot /tmp/replay.png   # other seeds: does it hold?

1. Rank fidelity: Kendall tau between the accuracy at the search's fidelity (``lo``) and at 4x the
   epochs (``hi``), over the table's candidates; and between the ``hi`` runs of two seeds, the table's noise.
2. Early stopping: how often ASHA's decision at a rung (top third goes on) agrees with the final
   ranking (top third at the last epoch), for each possible first rung, from the per-epoch curves.
3. Search efficiency: random search, TPE, TPE with ASHA (simulated from the curves) and NSGA-II replayed
   ``--replays`` times each against the table (its sub-grid is the whole search space: every proposal
   has a value, over-budget points are told as infeasible, a stalled sampler gets an untried candidate as in
   the search; ``tpe-told`` tells repeats their original's value instead of FAIL). Best-so-far against
   cumulative epochs: median and interquartile range, the compute each method needs to reach random search's
   median final best, and the share of paired replays (same seed) each method wins against random search.
Writes ``benchmarks/replay.png`` and prints markdown tables for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from ground_truth import BUDGET, DIMENSIONS  # noqa: E402

from tokennas.search.strategies.standalone import Standalone  # noqa: E402

STALL = Standalone.stall  # the standalone search's stall count, so the replays do the same


def load_table(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per candidate: the hi-fidelity accuracy and curve (means over seeds), the lo accuracy, FLOPs."""
    raw = pd.read_csv(path)
    raw["curve"] = raw["curve"].map(json.loads)
    hi = raw[raw["fidelity"] == "hi"]
    rows = []
    for candidate, group in hi.groupby("candidate"):
        lo = raw[(raw["candidate"] == candidate) & (raw["fidelity"] == "lo")]["val_acc"]
        rows.append({"candidate": candidate, "role": group["role"].iloc[0], "flops": group["flops"].iloc[0],
                     "params": group["params"].iloc[0], "hi": group["val_acc"].mean(), "seeds": len(group),
                     "hi_sd": group["val_acc"].std(), "lo": lo.mean() if len(lo) else np.nan,
                     "curve": np.mean(np.stack(group["curve"].to_list()), axis=0)})
    table = pd.DataFrame(rows)
    return table[table["role"] == "candidate"].reset_index(drop=True), table[table["role"] == "baseline"]


def rank_fidelity(table: pd.DataFrame) -> dict:
    from scipy.stats import kendalltau, spearmanr

    both = table.dropna(subset=["lo"])
    return {"candidates": len(both), "kendall_tau": kendalltau(both["lo"], both["hi"]).statistic,
            "spearman": spearmanr(both["lo"], both["hi"]).statistic}


def seed_agreement(path: Path) -> dict:
    """Kendall tau between the hi-fidelity accuracies of seed 0 and seed 1, over the candidates that have both:
    the table's own noise, a ceiling on what any lower fidelity can reach against it."""
    from scipy.stats import kendalltau

    raw = pd.read_csv(path)
    raw = raw[(raw["fidelity"] == "hi") & (raw["role"] == "candidate") & raw["seed"].isin([0, 1])]
    both = raw.pivot_table(index="candidate", columns="seed", values="val_acc").dropna()
    if both.shape[1] < 2:
        return {"candidates": 0, "kendall_tau": np.nan}
    return {"candidates": len(both), "kendall_tau": kendalltau(both[0], both[1]).statistic}


def recipe_fidelity(tuned: Path, old: Path) -> pd.DataFrame:
    """Kendall tau of lo against hi (seed 0 of each) for the old recipe and for the tuned one, over the
    candidates both tables hold (``ground_truth.py --recipe old`` builds the old one)."""
    from scipy.stats import kendalltau

    def seed0(path: Path) -> pd.DataFrame:
        raw = pd.read_csv(path)
        raw = raw[(raw["seed"] == 0) & (raw["role"] == "candidate")]
        return raw.pivot_table(index="candidate", columns="fidelity", values="val_acc").dropna()

    a, b = seed0(old), seed0(tuned)
    common = a.index.intersection(b.index)
    rows = []
    for name, table in (("old (1e-3 at batch 128, 1-epoch warm-up, smoothing 0.1, flips)", a),
                        ("tuned (3e-3 at batch 64, 0.3-epoch warm-up, no smoothing, shifts and flips)", b)):
        t = table.loc[common]
        rows.append({"recipe": name, "candidates": len(common), "kendall tau": kendalltau(t["lo"], t["hi"]).statistic,
                     "median hi": t["hi"].median(), "best hi": t["hi"].max()})
    return pd.DataFrame(rows)


def rung_agreement(table: pd.DataFrame) -> pd.DataFrame:
    """For each epoch r: share of candidates whose 'top third at epoch r' equals 'top third at the end'."""
    curves = np.stack(table["curve"].to_list())
    final = curves[:, -1]
    top_final = final >= np.percentile(final, 100 * 2 / 3)
    from scipy.stats import kendalltau

    rows = []
    for r in range(1, curves.shape[1]):
        at = curves[:, r - 1]
        top = at >= np.percentile(at, 100 * 2 / 3)
        rows.append({"rung (epoch)": r, "agreement": float(np.mean(top == top_final)),
                     "kept top-third finishers": float(np.mean(top[top_final])),
                     "kendall tau with final": kendalltau(at, final).statistic})
    return pd.DataFrame(rows)


class Replay:
    """One search against the table: Optuna asks over the sub-grid; every evaluation costs epochs.

    As in the search, a repeat is never trained again and is told FAIL (``tpe-told``: told the original's
    value instead), and after every ``stall`` misses in a row an untried feasible candidate is enqueued."""

    def __init__(self, table: pd.DataFrame, method: str, seed: int, budget: int, first_rung: int,
                 stall: int | None = None) -> None:
        self.lookup = {json.dumps(json.loads(p), sort_keys=True): row for p, row in
                       zip(table["params"], table.itertuples(), strict=True)}
        self.method, self.seed, self.budget, self.first_rung = method, seed, budget, first_rung
        self.stall = stall if stall is not None else STALL
        self.proposals = self.repeats = self.fallbacks = 0

    def run(self) -> list[tuple[int, float]]:
        """(cumulative epochs, best final accuracy so far) after each trained candidate."""
        import optuna

        from tokennas.search.studies import study as S

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        sampler = S.make_sampler("tpe" if self.method in ("tpe+asha", "tpe-told") else self.method, self.seed,
                                 self.budget)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        epochs_used, best, trace, seen = 0, -1.0, [], {}
        rungs: dict[int, list[float]] = {}
        rng, misses = np.random.default_rng(self.seed), 0
        while len(seen) < self.budget and self.proposals < 50 * self.budget:
            if misses and misses % self.stall == 0:  # the search's fallback (BudgetSearcher._enqueue_untried)
                untried = sorted(set(self.lookup) - set(seen))
                params = json.loads(untried[rng.integers(len(untried))])
                study.enqueue_trial({k: params[k] for k in DIMENSIONS})
                self.fallbacks += 1
            self.proposals += 1
            trial = study.ask()
            params = {k: trial.suggest_categorical(k, list(v)) for k, v in DIMENSIONS.items()}
            key = json.dumps({**params, "pool_kind": "max2d"}, sort_keys=True)
            row = self.lookup.get(key)
            if row is None:  # over the budget: told as infeasible, costs nothing
                trial.set_constraint("flops", 1.0)
                study.tell(trial, 0.0)
                misses += 1
                continue
            trial.set_constraint("flops", float(row.flops - BUDGET))
            if key in seen:  # a repeat is never trained again; FAIL is no evidence to a sampler
                self.repeats += 1
                misses += 1
                if self.method == "tpe-told" and seen[key] is not None:
                    study.tell(trial, seen[key])
                else:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            misses = 0
            curve = row.curve
            stopped_at = None
            if self.method == "tpe+asha":
                rung = self.first_rung
                while rung < len(curve):
                    recorded = rungs.setdefault(rung, [])
                    recorded.append(curve[rung - 1])
                    if curve[rung - 1] < np.percentile(recorded, 100 * 2 / 3):
                        stopped_at = rung
                        break
                    rung *= 3
            if stopped_at is not None:
                epochs_used += stopped_at
                seen[key] = None
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                epochs_used += len(curve)
                best = max(best, float(curve[-1]))
                seen[key] = float(curve[-1])
                study.tell(trial, float(curve[-1]))
            trace.append((epochs_used, best))
        if len(seen) < self.budget:  # a replay that stopped short would pass for a cheap one
            raise RuntimeError(f"{self.method} replay, seed {self.seed}: {len(seen)} of {self.budget} candidates "
                               f"trained in {self.proposals} proposals")
        return trace


def best_at(trace: list[tuple[int, float]], grid: np.ndarray) -> np.ndarray:
    epochs = np.array([e for e, _ in trace])
    bests = np.array([b for _, b in trace])
    out = np.full(len(grid), np.nan)
    for i, g in enumerate(grid):
        done = bests[epochs <= g]
        out[i] = done.max() if len(done) and done.max() >= 0 else np.nan
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, default=Path(__file__).parent / "ground_truth_psvit30M.csv")
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument("--budget", type=int, default=20, help="trained candidates per replay")
    parser.add_argument("--first-seed", type=int, default=0, help="replay seeds are first-seed .. first-seed+replays-1")
    parser.add_argument("--plot", type=Path, default=Path(__file__).parent / "replay.png")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # medians of replays that have no best yet

    from tokennas.search.tune.schedulers import first_rung
    from tokennas.train import TrainSettings

    table, baseline = load_table(args.table)
    epochs = len(table["curve"].iloc[0])
    print(f"## Ground truth: {len(table)} candidates, seeds per candidate {table['seeds'].min()}-"
          f"{table['seeds'].max()}, {epochs} epochs; best {table['hi'].max():.4f}, median {table['hi'].median():.4f}"
          + (f", baseline {baseline['hi'].iloc[0]:.4f}" if len(baseline) else ""))
    fidelity = rank_fidelity(table)
    print(f"\n## Rank fidelity\nKendall tau {fidelity['kendall_tau']:.3f}, Spearman {fidelity['spearman']:.3f} "
          f"over {fidelity['candidates']} candidates (lo against hi)")
    seeds = seed_agreement(args.table)
    print(f"Kendall tau {seeds['kendall_tau']:.3f} between seed 0 and seed 1 at the high fidelity over "
          f"{seeds['candidates']} candidates (the table's own noise)")
    old = args.table.with_name(args.table.stem + "_old_recipe.csv")
    if old.exists():
        print("\n## Rank fidelity before and after tuning (seed 0, lo against hi)\n"
              + recipe_fidelity(args.table, old).to_markdown(index=False, floatfmt=".3f"))
    print("\n## Rung agreement\n" + rung_agreement(table).to_markdown(index=False, floatfmt=".3f"))

    rung = first_rung(epochs, TrainSettings().warmup_epochs)
    grid = np.arange(1, epochs * args.budget + 1)
    curves, finals, counts = {}, {}, {}
    for method in ("random", "tpe", "tpe+asha", "nsga2", "tpe-told"):
        replays = [Replay(table, method, seed, args.budget, rung)
                   for seed in range(args.first_seed, args.first_seed + args.replays)]
        curves[method] = np.stack([best_at(replay.run(), grid) for replay in replays])
        finals[method] = curves[method][:, -1]
        counts[method] = {k: np.mean([getattr(r, k) for r in replays]) for k in ("proposals", "repeats", "fallbacks")}
    target = np.nanmedian(finals["random"])

    def reach(runs: np.ndarray) -> int | None:
        median = np.nanmedian(runs, axis=0)
        return int(grid[np.argmax(median >= target)]) if (median >= target).any() else None

    random_reach = reach(curves["random"])
    rows = []
    for method, runs in curves.items():
        epochs_needed = reach(runs)
        rows.append({"method": method, "median final best": np.nanmedian(finals[method]),
                     "IQR": f"{np.nanpercentile(finals[method], 25):.4f}-{np.nanpercentile(finals[method], 75):.4f}",
                     "epochs to random's median final best": epochs_needed,
                     "compute vs random": None if epochs_needed is None else epochs_needed / random_reach,
                     "wins vs random": float(np.mean(finals[method] > finals["random"])),
                     "ties": float(np.mean(finals[method] == finals["random"])),
                     **{f"{k} per replay": v for k, v in counts[method].items()}})
    print(f"\n## Replays ({args.replays} per method, {args.budget} trained candidates each, "
          f"ASHA first rung at epoch {rung}, an untried candidate after {STALL} misses in a row; "
          f"target = random's median final best {target:.4f})")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f"))
    checkpoints = [g for g in (epochs, 2 * epochs, 5 * epochs, 10 * epochs, 20 * epochs) if g <= grid[-1]]
    print("\nMedian best-so-far [IQR] at cumulative epochs:")
    print(pd.DataFrame({m: [f"{np.nanmedian(r[:, g - 1]):.4f} [{np.nanpercentile(r[:, g - 1], 25):.4f}-"
                            f"{np.nanpercentile(r[:, g - 1], 75):.4f}]" for g in checkpoints]
                        for m, r in curves.items()}, index=checkpoints).to_markdown())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method, runs in curves.items():
        ax.plot(grid, np.nanmedian(runs, axis=0), label=method)
        ax.fill_between(grid, np.nanpercentile(runs, 25, axis=0), np.nanpercentile(runs, 75, axis=0), alpha=0.2)
    ax.axhline(target, color="black", ls=":", lw=1, label="random's median final best")
    ax.set_xlabel("cumulative training epochs")
    ax.set_ylabel("best validation accuracy so far")
    ax.set_title(f"Replays against the ground truth ({len(table)} psvit candidates, {args.replays} seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
