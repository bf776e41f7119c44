"""Is the search worth its compute? Figures from the committed ground-truth table, no training.

    python benchmarks/bench_validity.py [--table benchmarks/ground_truth_psvit30M.csv --replays 200 --budget 20]
    python benchmarks/bench_validity.py --first-seed 200 --plot /tmp/replay.png   # other seeds: does it hold?
    python benchmarks/bench_validity.py --replays 20 --methods tpe+asha --variants  # a quick look
    python benchmarks/bench_validity.py --methods tpe+asha --screens --plot /tmp/screens.png  # none adopted

1. Rank fidelity: Kendall tau between the accuracy at the search's fidelity (``lo``) and at 4x the
   epochs (``hi``), over the table's candidates; and between the ``hi`` runs of two seeds, the table's noise.
2. Early stopping: how often ASHA's decision at a rung (top third goes on) agrees with the final
   ranking (top third at the last epoch), for each possible first rung, from the per-epoch curves.
3. Search efficiency: each replay is one search run by the search's own ``BudgetSearcher`` (its sampler from
   ``study.make_sampler``, the feasible start-up, the budget check, repeats told their original's outcome through
   the ``StudyIndex``, an untried candidate after ``Standalone.stall`` misses) over an in-memory study and the psvit
   space narrowed to the table's sub-grid (``TableSpace``: psvit's own ``build`` and ``unused``, so every feasible
   config it builds is a row of the table). The replay plays Ray's part, one trial at a time: a suggested config
   "trains" by reporting its 8-epoch curve from the table, one epoch per result, to the scheduler and the searcher
   in Ray's order. Early stopping is Ray's ASHA as ``schedulers.make_scheduler`` builds it (``tpe+asha``, the
   search's default), or Optuna's ``HyperbandPruner`` / ``SuccessiveHalvingPruner`` on the study (``tpe+hyperband``,
   ``tpe+sha``: BOHB-like, TPE models the stopped trials through their intermediate values). Random search, TPE
   and NSGA-II train every candidate to the end. Best-so-far against cumulative epochs: median and interquartile
   range, the compute each method needs to reach random search's median final best, and the paired replays (same
   seed) each method wins, ties and loses against random search and against the search's default method, marked
   ``(default)``. ``--variants`` adds cheap variants (first rung at epoch 1, a shorter TPE start-up); ``--screens``
   the screens: TPE's settings (8 or 128 expected-improvement candidates, prior weight 0.5, two trials or a quarter
   in the good group, ``group=True``, independent instead of multivariate), ASHA's reduction factor 4, a QMC
   start-up, start-ups of 2 and 4, proposals restricted to the budget, the widths asked in order. And what the
   compute target asks of any sampler: the epochs a search needs when it proposes the table's best config right
   after its start-up, or after a few misses (``after_startup``).
Writes ``benchmarks/replay.png`` and prints markdown tables for RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from ground_truth import BUDGET, DIMENSIONS  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402

from tokennas.flops import count_flops  # noqa: E402
from tokennas.search.strategies.standalone import Standalone  # noqa: E402
from tokennas.search.tune.searcher import BudgetSearcher  # noqa: E402
from tokennas.spaces import Inputs  # noqa: E402
from tokennas.spaces.psvit import PSViTSpace  # noqa: E402

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
                     "params": group["params"].iloc[0], "config": group["config"].iloc[0],
                     "hi": group["val_acc"].mean(), "seeds": len(group),
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


class TableSpace(PSViTSpace):
    """The real psvit space restricted to the table's sub-grid: the same ``build`` and ``unused`` (PSViT's), with
    ``dimensions`` narrowed to ``ground_truth.DIMENSIONS`` and max pooling fixed (the table's only pooling kind).
    The searcher asks, builds, counts FLOPs, checks the budget and finds repeats through it as through any space;
    every feasible config it can build is a row of the table (``Replay`` checks)."""

    name = "psvit-table"

    def dimensions(self, inputs: Inputs) -> dict[str, tuple]:
        return dict(DIMENSIONS)

    def build(self, params: dict, inputs: Inputs):
        return super().build({**params, "pool_kind": "max2d"}, inputs)


class OrderedWidthsSpace(TableSpace):
    """A screen (``tpe+asha ordered``): the widths, unevenly spaced, asked as their position in order (an Optuna
    int, so TPE models neighbouring widths) instead of as a categorical. The sampler's parameters hold the position;
    ``completed`` and ``asked`` translate between the two."""

    WIDTHS = DIMENSIONS["embed_dim"]

    class _ByPosition:
        """The trial as psvit's ``suggest`` sees it, the widths' categorical asked as an int position."""

        def __init__(self, trial) -> None:
            self.trial = trial

        def __getattr__(self, name: str):
            return getattr(self.trial, name)

        def suggest_categorical(self, name: str, choices: list):
            if name == "embed_dim":
                return choices[self.trial.suggest_int(name, 0, len(choices) - 1)]
            return self.trial.suggest_categorical(name, choices)

    def suggest(self, trial, inputs: Inputs):
        return super().suggest(self._ByPosition(trial), inputs)

    def completed(self, asked: dict, inputs: Inputs):
        if "embed_dim" in asked:
            asked = {**asked, "embed_dim": self.WIDTHS[asked["embed_dim"]]}
        return super().completed(asked, inputs)

    def asked(self, params: dict, inputs: Inputs) -> dict:
        out = super().asked(params, inputs)
        return {**out, "embed_dim": self.WIDTHS.index(out["embed_dim"])} if "embed_dim" in out else out


class FeasibleOnlySearcher(BudgetSearcher):
    """A screen (``tpe+asha feasible``): ``SkipTried`` draws again when a sample is over the budget as well as when
    its config was tried, so TPE's choice is restricted to the feasible set and fewer over-budget proposals (told
    the worst accuracy) push its model away from the budget's edge."""

    def _tried(self, params: dict) -> bool | None:
        tried = super()._tried(params)
        if tried is not False:
            return tried
        return count_flops(self.space.build(self.space.completed(params, self.inputs), self.inputs)) > self.budget


@dataclasses.dataclass(frozen=True)
class Method:
    """A replayed search: a sampler as ``study.make_sampler`` builds it and what stops candidates early.

    ``stopper``: ``fifo`` (none), ``asha`` (Ray's ASHA as ``schedulers.make_scheduler`` builds it, ``CandidateASHA``,
    first rung ``first_rung`` or the search's), ``sha`` / ``hyperband`` (Optuna's ``SuccessiveHalvingPruner`` /
    ``HyperbandPruner`` on the study, minimum resource ``first_rung`` or the search's first rung, reduction factor 3).
    ``startup``: TPE's feasible start-up count instead of ``make_sampler``'s. The screens (``--screens``): ``tpe``,
    further ``TPESampler`` arguments (``make_sampler``'s ``tpe``); ``qmc``, the start-up drawn by Optuna's
    ``QMCSampler`` (Sobol, scrambled with the replay's seed) instead of at random; ``feasible``,
    ``FeasibleOnlySearcher``; ``ordered``, ``OrderedWidthsSpace``; ``reduction_factor``, ASHA's (3 in the search)."""

    label: str
    sampler: str
    stopper: str = "fifo"
    first_rung: int | None = None
    startup: int | None = None
    tpe: tuple = ()
    qmc: bool = False
    feasible: bool = False
    ordered: bool = False
    reduction_factor: int | None = None

    def pruner(self, epochs: int, rung: int):
        import optuna

        if self.stopper == "sha":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=self.first_rung or rung, reduction_factor=3)
        if self.stopper == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=self.first_rung or rung, max_resource=epochs,
                                                  reduction_factor=3)
        return optuna.pruners.NopPruner()


METHODS = (Method("random", "random"), Method("tpe", "tpe"), Method("tpe+asha", "tpe", "asha"),
           Method("nsga2", "nsga2"), Method("tpe+hyperband", "tpe", "hyperband"))
# cheap variants (--variants): Optuna's successive halving alone, the first rung at epoch 1 (ASHA, Hyperband's
# minimum resource), TPE's start-up after 3 feasible candidates instead of make_sampler's 6
VARIANTS = (Method("tpe+sha", "tpe", "sha"), Method("tpe+asha r1", "tpe", "asha", first_rung=1),
            Method("tpe+hyperband r1", "tpe", "hyperband", first_rung=1),
            Method("tpe+asha s3", "tpe", "asha", startup=3),
            Method("random+asha", "random", "asha"))  # what early stopping alone buys


def two_good(n: int) -> int:
    """TPE's good group: the best two trials (Optuna's default is the best tenth, at least one)."""
    return min(2, n)


def a_quarter(n: int) -> int:
    """TPE's good group: the best quarter of the trials, at least one and at most 25 (Optuna's default: a tenth)."""
    return min(max(1, -(-n // 4)), 25)


# screens (--screens): settings of TPE and ASHA, other start-ups, encodings and proposal rules; none is adopted
SCREENS = (Method("tpe+asha rf4", "tpe", "asha", reduction_factor=4),
           Method("tpe+asha ei128", "tpe", "asha", tpe=(("n_ei_candidates", 128),)),
           Method("tpe+asha prior0.5", "tpe", "asha", tpe=(("prior_weight", 0.5),)),
           Method("tpe+asha good2", "tpe", "asha", tpe=(("gamma", two_good),)),
           Method("tpe+asha group", "tpe", "asha", tpe=(("group", True),)),
           Method("tpe+asha qmc", "tpe", "asha", qmc=True),
           Method("tpe+asha feasible", "tpe", "asha", feasible=True),
           Method("tpe+asha ordered", "tpe", "asha", ordered=True),
           Method("tpe+asha indep", "tpe", "asha", tpe=(("multivariate", False),)),
           Method("tpe+asha quarter", "tpe", "asha", tpe=(("gamma", a_quarter),)),
           Method("tpe+asha ei8", "tpe", "asha", tpe=(("n_ei_candidates", 8),)),
           Method("tpe+asha s2", "tpe", "asha", startup=2),
           Method("tpe+asha s4", "tpe", "asha", startup=4))


def is_default(method: Method) -> bool:
    """The search's own defaults: ``SearchSettings``' sampler and scheduler, and the rest as the search sets it."""
    from tokennas.search.settings import SearchSettings

    field = {f.name: f.default for f in dataclasses.fields(SearchSettings)}
    return (method.sampler, method.stopper) == (field["sampler"], field["scheduler"]) \
        and method == Method(method.label, method.sampler, method.stopper)


def label(method: Method) -> str:
    return method.label + (" (default)" if is_default(method) else "")


class Replay:
    """One search against the table, run by the search's own ``BudgetSearcher`` over an in-memory Optuna study.

    The searcher proposes as in a search (its sampler from ``make_sampler``, the feasible start-up, the budget
    check, repeats told their original's outcome through the ``StudyIndex``, an untried candidate after ``stall``
    misses); the replay plays Ray's part, one trial at a time: each suggested config trains by reading its curve
    from the table, one epoch per result, handed to the scheduler and the searcher in the order Ray's
    ``TuneController`` does (scheduler first; on STOP the scheduler's and the searcher's ``on_trial_complete`` with
    the last result, else the searcher's ``on_trial_result``). ASHA is Ray's own scheduler, driven with Ray
    ``Trial`` stubs. Optuna's pruners decide from the intermediate values the searcher reported (after the
    searcher's ``on_trial_result``, through the live trial's ``should_prune``). Every trained candidate costs its
    epochs."""

    def __init__(self, table: pd.DataFrame, method: Method | str, seed: int, budget: int, rung: int,
                 stall: int | None = None) -> None:
        if isinstance(method, str):  # a label (bench_oneshot.py asks for "random")
            method = next(m for m in METHODS + VARIANTS + SCREENS if m.label == method)
        self.space, self.inputs = (OrderedWidthsSpace if method.ordered else TableSpace)(), Inputs(32, 1, 10)
        self.lookup, self.feasible = table_lookup(table)
        self.method, self.seed, self.budget, self.rung = method, seed, budget, rung
        self.stall = stall if stall is not None else STALL
        self.proposals = self.repeats = self.fallbacks = self.infeasible = self.stopped = 0
        # the table's top two configs: when the replay first proposed one (cumulative epochs before it), how many
        # it proposed and how many of those the scheduler stopped early
        ranked = sorted(self.lookup, key=lambda k: self.lookup[k].hi, reverse=True)
        self.top_two, self.first_top = set(ranked[:2]), None
        self.top_proposed = self.top_stopped = 0
        self.study = self.scheduler = None

    def run(self) -> list[tuple[int, float]]:
        """(cumulative epochs, best final accuracy so far) after each trained candidate."""
        import optuna
        from ray.tune.experiment import Trial

        from tokennas.config import config_key
        from tokennas.search.studies import study as S
        from tokennas.search.tune.schedulers import CandidateASHA, make_scheduler
        from tokennas.train import TrainSettings

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the screens' QMC, group
        method, epochs = self.method, len(next(iter(self.lookup.values())).curve)
        sampler = S.make_sampler(method.sampler, self.seed, self.budget, **dict(method.tpe))
        if method.startup is not None or method.qmc:  # FeasibleStartup's, inside make_sampler's SkipTried
            startup = sampler.sampler if isinstance(sampler, S.SkipTried) else sampler
            if not isinstance(startup, S.FeasibleStartup):
                raise TypeError(f"{method.label}: make_sampler's {method.sampler} has no feasible start-up to set")
            if method.startup is not None:
                startup.n_startup = method.startup
            if method.qmc:
                startup.startup = optuna.samplers.QMCSampler(scramble=True, seed=self.seed,
                                                             warn_independent_sampling=False)
        # named by the seed: Optuna's HyperbandPruner puts a trial in a bracket by a hash of the study's name and the
        # trial's number, and an unnamed study gets a random name, so the brackets changed from run to run
        self.study = study = optuna.create_study(study_name=f"replay-{self.seed}", direction="maximize",
                                                 sampler=sampler, pruner=method.pruner(epochs, self.rung))
        searcher = (FeasibleOnlySearcher if method.feasible else BudgetSearcher)(
            study, self.space, self.inputs, BUDGET, epochs, stall=self.stall, trials=self.budget,
            feasible=self.feasible, seed=self.seed)
        scheduler = None
        if method.stopper == "asha":
            scheduler = make_scheduler("asha", "acc", epochs, TrainSettings().warmup_epochs) \
                if method.first_rung is None and method.reduction_factor is None else \
                CandidateASHA(time_attr="epoch", max_t=epochs, grace_period=method.first_rung or self.rung,
                              reduction_factor=method.reduction_factor or 3)
            scheduler.set_search_properties("val_acc", "max")  # as the Tuner does
        self.scheduler = scheduler
        np.random.seed(self.seed)  # Ray's ASHA draws a bracket from numpy's global generator (one bracket here)
        epochs_used, best, trace = 0, -1.0, []
        for number in itertools.count():
            trial_id = f"replay_{number:05d}"
            suggestion = searcher.suggest(trial_id)
            if suggestion == Searcher.FINISHED:
                break
            if suggestion is None:  # one trial at a time: the searcher has nothing in flight to wait for
                raise RuntimeError(f"{method.label} replay, seed {self.seed}: the searcher suggested nothing")
            key = config_key(suggestion["config"])
            curve = self.lookup[key].curve
            def report(result: dict, trial_id: str = trial_id) -> bool:
                searcher.on_trial_result(trial_id, result)
                return method.stopper in ("sha", "hyperband") and searcher.live[trial_id].should_prune()

            epoch, result = play(curve, scheduler, Trial("__fake", config=suggestion, trial_id=trial_id, stub=True),
                                 report)
            searcher.on_trial_complete(trial_id, result)
            if key in self.top_two:
                self.first_top = epochs_used if self.first_top is None else self.first_top
                self.top_proposed += 1
                self.top_stopped += epoch < len(curve)
            epochs_used += epoch
            self.stopped += epoch < len(curve)
            if epoch == len(curve):
                best = max(best, float(curve[-1]))
            trace.append((epochs_used, best))
        self.proposals, self.repeats = len(study.trials), searcher.repeats
        self.fallbacks, self.infeasible = searcher.fallbacks, searcher.infeasible
        if len(trace) != self.budget:  # a replay that stopped short would pass for a cheap one
            raise RuntimeError(f"{method.label} replay, seed {self.seed}: {len(trace)} of {self.budget} candidates "
                               f"trained in {self.proposals} proposals")
        return trace


def play(curve, scheduler, trial, report=None) -> tuple[int, dict]:
    """``trial`` trains by its table ``curve``, one epoch per result, in the order Ray's ``TuneController`` calls:
    the scheduler (None: FIFO) first; while it goes on, ``report(result)`` (the searcher's ``on_trial_result``;
    True when a pruner stops the trial). At the end the scheduler's ``on_trial_complete``. Returns the last epoch
    and its result."""
    from ray.tune.schedulers import TrialScheduler

    if scheduler is not None:
        scheduler.on_trial_add(None, trial)
    for epoch, acc in enumerate(curve, start=1):
        result = {"epoch": epoch, "training_iteration": epoch, "val_acc": float(acc), "time_total_s": 0.0}
        stop = epoch == len(curve)
        if scheduler is not None:
            stop = scheduler.on_trial_result(None, trial, result) == TrialScheduler.STOP or stop
        if not stop and report is not None:
            stop = report(result)
        if stop:
            if scheduler is not None:
                scheduler.on_trial_complete(None, trial, result)
            return epoch, result
    raise ValueError("an empty curve")


_LOOKUPS: dict[int, tuple[dict, dict]] = {}


def table_lookup(table: pd.DataFrame) -> tuple[dict, dict]:
    """(config key -> the table's row, the space's feasible set as ``Space.feasible`` gives it) for ``TableSpace``,
    once per table. Checks that the space builds, from each row's parameters, the config the table recorded, and
    that its feasible set under the budget is exactly the table's configs."""
    from tokennas.config import config_from_dict, config_key

    if id(table) in _LOOKUPS:
        return _LOOKUPS[id(table)]
    space, inputs, lookup = TableSpace(), Inputs(32, 1, 10), {}
    for row in table.itertuples():
        key = config_key(space.build(json.loads(row.params), inputs))
        if key != config_key(config_from_dict(json.loads(row.config))):
            raise ValueError(f"{row.candidate}: the space builds another config from the table's parameters")
        lookup[key] = row
    feasible = space.feasible(BUDGET, inputs)[0]
    if set(feasible) != set(lookup):
        raise ValueError(f"the space's {len(feasible)} feasible configs are not the table's {len(lookup)}")
    _LOOKUPS[id(table)] = lookup, feasible
    return lookup, feasible


def after_startup(table: pd.DataFrame, target: float, startup: int, misses: int, seeds: range) -> float:
    """What a compute target asks of any sampler: the median cumulative epochs (over ``seeds``) until a config at
    or above ``target`` has trained to its last epoch, for a search that proposes ``startup`` random feasible
    configs (as the search's start-up does), then ``misses`` more below the target, then the table's best, every one
    under the search's ASHA (as ``make_scheduler`` builds it). A start-up that finds such a config ends it early.
    The misses are drawn at random, so this is what a sampler with that start-up and as many typical misses needs,
    not a strict bound: one whose misses ASHA stops sooner (at epoch 2 rather than 6 or 8) would spend less."""
    import random

    from ray.tune.experiment import Trial

    from tokennas.search.tune.schedulers import make_scheduler
    from tokennas.train import TrainSettings

    lookup, _ = table_lookup(table)
    keys, best = sorted(lookup), max(lookup, key=lambda key: lookup[key].hi)
    spent = []
    for seed in seeds:
        rng = random.Random(seed)
        np.random.seed(seed)  # Ray's ASHA draws its bracket from numpy's global generator, as in a replay
        scheduler = make_scheduler("asha", "acc", len(lookup[best].curve), TrainSettings().warmup_epochs)
        scheduler.set_search_properties("val_acc", "max")
        first = rng.sample(keys, startup)
        below = [key for key in keys if lookup[key].hi < target and key not in first]
        epochs, reached = 0, np.inf
        for number, key in enumerate(first + rng.sample(below, misses) + [best]):
            curve = lookup[key].curve
            epoch, _ = play(curve, scheduler, Trial("__fake", config={}, trial_id=f"bound_{number}", stub=True))
            epochs += epoch
            if epoch == len(curve) and lookup[key].hi >= target:
                reached = epochs
                break
        spent.append(reached)  # inf: ASHA stopped every config at the target, the table's best among them
    return float(np.median(spent))


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
    parser.add_argument("--methods", nargs="*", default=None,
                        help="replay only these methods (labels without '(default)'); random always runs")
    parser.add_argument("--variants", action="store_true",
                        help="also the cheap variants (first rung, start-up count) of TPE with a scheduler")
    parser.add_argument("--screens", action="store_true",
                        help="also the screens: settings of TPE and ASHA, a QMC start-up, proposals restricted to the "
                             "budget, widths asked in order (none adopted; RESULTS.md)")
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
    curves, finals, counts, finding = {}, {}, {}, {}
    chosen = [m for m in METHODS + (VARIANTS if args.variants else ()) + (SCREENS if args.screens else ())
              if not args.methods or m.label in args.methods or m.sampler == "random"
              or (m in SCREENS and not {s.label for s in SCREENS} & set(args.methods))]
    for method in chosen:
        started = time.perf_counter()
        replays = [Replay(table, method, seed, args.budget, rung)
                   for seed in range(args.first_seed, args.first_seed + args.replays)]
        name = label(method)
        curves[name] = np.stack([best_at(replay.run(), grid) for replay in replays])
        finals[name] = curves[name][:, -1]
        counts[name] = {k: np.mean([getattr(r, k) for r in replays])
                        for k in ("proposals", "infeasible", "repeats", "fallbacks", "stopped")}
        found = [r.first_top for r in replays if r.first_top is not None]
        finding[name] = {"replays proposing one": f"{len(found) / len(replays):.1%}",
                         "epochs before the first (median of those)": f"{np.median(found):.0f}" if found else "-",
                         "stopped early / proposed": f"{sum(r.top_stopped for r in replays)} / "
                                                     f"{sum(r.top_proposed for r in replays)}"}
        print(f"{name}: {args.replays} replays in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    target = np.nanmedian(finals["random"])

    def reach(runs: np.ndarray) -> int | None:
        median = np.nanmedian(runs, axis=0)
        return int(grid[np.argmax(median >= target)]) if (median >= target).any() else None

    random_reach = reach(curves["random"])
    default = next((name for name in curves if name.endswith("(default)")), None)
    rows = []
    for method, runs in curves.items():
        epochs_needed = reach(runs)
        row = {"method": method, "median final best": f"{np.nanmedian(finals[method]):.4f}",
               "IQR": f"{np.nanpercentile(finals[method], 25):.4f}-{np.nanpercentile(finals[method], 75):.4f}",
               "epochs to random's median final best": "not reached" if epochs_needed is None else epochs_needed,
               "compute vs random": "-" if epochs_needed is None else f"{epochs_needed / random_reach:.2f}"}
        for against, short in (("random", "random"), (default, "default")):
            if against is None or against == method or (short == "default" and method == "random"):
                row[f"won/tied/lost vs {short}"] = "-"
                continue
            row[f"won/tied/lost vs {short}"] = (f"{np.mean(finals[method] > finals[against]):.1%} / "
                                               f"{np.mean(finals[method] == finals[against]):.1%} / "
                                               f"{np.mean(finals[method] < finals[against]):.1%}")
        rows.append(row | {f"{k} per replay": f"{v:.1f}" for k, v in counts[method].items()})
    print(f"\n## Replays ({args.replays} per method, {args.budget} trained candidates each, "
          f"first rung at epoch {rung} unless named, an untried candidate after {STALL} misses in a row, "
          f"one trial at a time; "
          f"target = random's median final best {target:.4f})")
    print(pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True))
    from tokennas.search.studies.study import make_sampler

    startup = make_sampler("tpe", 0, args.budget).sampler.n_startup  # SkipTried around FeasibleStartup
    seeds = range(args.first_seed, args.first_seed + args.replays)
    bounds = pd.DataFrame({f"start-up {n}" + (" (the search's)" if n == startup else ""):
                           [f"{e:.0f} ({e / random_reach:.2f}x)" for e in
                            (after_startup(table, target, n, misses, seeds) for misses in range(4))]
                           for n in sorted({startup, 3})}, index=pd.Index(range(4), name="misses after it"))
    print(f"\nWhat reaching random's median final best asks of any sampler: median epochs (and against random's "
          f"{random_reach}) until a config at the target has trained, when the table's best is proposed after a "
          "random start-up and some misses below the target, under ASHA:")
    print(bounds.to_markdown(disable_numparse=True))
    print("\nFinding the table's top two configs (the first proposed: cumulative epochs spent before it):")
    print(pd.DataFrame(finding).T.rename_axis("method").to_markdown(disable_numparse=True))
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
        if method.split(" (")[0] not in [m.label for m in METHODS]:
            continue  # the variants would crowd the plot; the tables have them
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
