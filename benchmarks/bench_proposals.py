"""Per-proposal cost of the searcher against the size of the study (issue 21: a proposal should cost the same at trial
100 and at trial 10,000).

The real ``BudgetSearcher.suggest`` and ``on_trial_complete`` on psvit under 30M MACs, on studies that already hold
100, 1,000 and 10,000 trials; nothing is trained (a candidate's accuracy is a hash of its config). Optuna's
RandomSampler proposes by default, so that the sampler's own cost (TPE's grows with the study) does not hide the
searcher's; ``--sampler tpe`` measures TPE as the search runs it. The existing trials mix what a run's study holds
(trained, stopped early, over budget, repeats, failed, interrupted), with configs that no new proposal repeats, so
that the proposals timed at every size meet the same outcomes.

The sizes are timed in turn, one candidate each per round, the order rotating each round; a round's figure at one
size is its seconds per Optuna proposal (a candidate may take several: over budget, repeats). Reported: the median
ms per proposal, the median of the paired ratios against the smallest size (with their interquartile range), the
first proposal (it builds the searcher's index, as after ``--resume``), and one full scan of the study
(``coordination.counts``) for scale: before issue 21 the searcher made about six scans per proposal.

    python benchmarks/bench_proposals.py [--sizes 100 1000 10000] [--storage memory sqlite] [--sampler random]
                                         [--rounds 30] [--cache DIR]

SQLite studies are built once into ``--cache`` (``study.add_trials``) and copied before each run: a run interrupted
while building resumes with the sizes already built. The cache is in ``/dev/shm`` where there is one: on tmpfs a
commit waits for no disk, and a disk's flushes (about ten commits per proposal) cost the same at every size.
"""

from __future__ import annotations

import argparse
import datetime
import random
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import optuna
from optuna.trial import TrialState, create_trial

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from tokennas.config import config_key  # noqa: E402
from tokennas.flops import count_flops  # noqa: E402
from tokennas.search.studies import coordination as C  # noqa: E402
from tokennas.search.studies import study as S  # noqa: E402
from tokennas.search.tune.searcher import BudgetSearcher  # noqa: E402
from tokennas.spaces import Inputs, get_space  # noqa: E402

SPACE, BUDGET = "psvit", 30_000_000
# what a run's study holds, roughly (the one-shot tokens search: most proposals over budget or repeated)
KINDS = {"trained": 0.30, "pruned": 0.10, "infeasible": 0.40, "repeat": 0.15, "failed": 0.02, "interrupted": 0.03}


def accuracy(config: dict) -> float:
    """The table the objective reads: a fixed accuracy per config."""
    return 0.4 + (zlib.crc32(config_key(config).encode()) % 1000) / 2000


def templates(n: int = 300) -> list[tuple[dict, dict, dict, int]]:
    """(params, distributions, config, MACs) of ``n`` random proposals of the space."""
    space, inputs = get_space(SPACE), Inputs()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    found = []
    for _ in range(n):
        trial = study.ask()
        config = space.suggest(trial, inputs)
        study.tell(trial, 0.0)
        frozen = study.trials[-1]
        found.append((frozen.params, frozen.distributions, config.to_dict(), count_flops(config)))
    return found


def existing(size: int) -> list[optuna.trial.FrozenTrial]:
    """``size`` finished trials of the kinds in ``KINDS``; each config has a ``bench`` field: none is proposed again."""
    rng, pool = random.Random(size), templates()
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=size)
    trials = []
    for number, kind in enumerate(kinds):
        params, distributions, config, flops = rng.choice(pool)
        config = {**config, "bench": number}
        acc = accuracy(config)
        attrs = {"config": config, "flops": flops, "params": 1000, C.CLAIMED: True}
        common = {"params": params, "distributions": distributions, "constraints": {"flops": -1.0}}
        if kind == "trained":
            trials.append(create_trial(value=acc, user_attrs={**attrs, "val_acc": acc, "epochs": 1}, **common))
        elif kind == "pruned":
            trials.append(create_trial(state=TrialState.PRUNED, value=acc, intermediate_values={1: acc},
                                       user_attrs={**attrs, "val_acc": acc, "epochs": 1}, **common))
        elif kind == "infeasible":
            del attrs[C.CLAIMED]
            trials.append(create_trial(value=0.0, user_attrs={**attrs, "infeasible": True},
                                       **{**common, "constraints": {"flops": 1e6}}))
        elif kind == "repeat":
            del attrs[C.CLAIMED]
            trials.append(create_trial(value=acc, user_attrs={**attrs, "repeat_of": max(0, number - 1)}, **common))
        else:
            reason = {"failed": {"error": "RuntimeError: out of memory"}, "interrupted": {"interrupted": "killed"}}
            trials.append(create_trial(state=TrialState.FAIL, user_attrs={**attrs, **reason[kind]}, **common))
    return trials


def sampler(name: str) -> optuna.samplers.BaseSampler:
    return S.make_sampler(name, 0, 1_000_000)


def encoding() -> str:
    """A short digest of the space's distributions: the cached studies are built for one encoding."""
    import hashlib

    dists = get_space(SPACE).distributions(Inputs())
    return hashlib.sha256(repr(sorted(dists.items())).encode()).hexdigest()[:8]


def open_sized(size: int, storage: str, sampler_name: str, cache: Path, scratch: Path) -> optuna.Study:
    """A study of ``size`` existing trials: in memory (built now), or a copy of the cached SQLite file."""
    if storage == "memory":
        study = S.open_study(optuna.storages.InMemoryStorage(), "acc", sampler(sampler_name), create=True)
        study.add_trials(existing(size))
        return study
    built = cache / f"{SPACE}-{size}-{encoding()}.db"  # a study of another encoding is not reused
    if not built.exists():
        partial = built.with_name(f".{built.name}.tmp")
        partial.unlink(missing_ok=True)
        started = time.perf_counter()
        study = optuna.create_study(storage=f"sqlite:///{partial}", study_name=S.STUDY_NAME, direction="maximize")
        study.add_trials(existing(size))
        partial.replace(built)
        print(f"built {built} ({size:,} trials) in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    copy = scratch / f"{size}" / "study.db"
    copy.parent.mkdir()
    shutil.copyfile(built, copy)
    return S.open_study(copy.parent, "acc", sampler(sampler_name))


def one_candidate(searcher: BudgetSearcher, trial_id: str) -> tuple[float, int]:
    """Seconds for one candidate, suggested and completed, and the Optuna proposals it took."""
    before = len(searcher.study.get_trials(deepcopy=False))
    started = time.perf_counter()
    suggestion = searcher.suggest(trial_id)
    searcher.on_trial_complete(trial_id, {"val_acc": accuracy(suggestion["config"]), "epoch": 1,
                                          "time_total_s": 0.0})
    seconds = time.perf_counter() - started
    return seconds, len(searcher.study.get_trials(deepcopy=False)) - before


def quartiles(values: list[float]) -> tuple[float, float, float]:
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return median, low, high


def measure(sizes: list[int], storage: str, sampler_name: str, rounds: int, cache: Path) -> None:
    space, inputs = get_space(SPACE), Inputs()
    feasible, _ = space.feasible(BUDGET, inputs)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as folder:  # the SQLite copies, beside the cache
        studies = {size: open_sized(size, storage, sampler_name, cache, Path(folder)) for size in sizes}
        scan = {}
        for size, study in studies.items():
            timings = []
            for _ in range(5):
                started = time.perf_counter()
                C.counts(study)
                timings.append(time.perf_counter() - started)
            scan[size] = statistics.median(timings)
        searchers = {size: BudgetSearcher(study, space, inputs, BUDGET, max_epochs=1, stall=20, feasible=feasible,
                                          seed=0) for size, study in studies.items()}
        first = {size: one_candidate(s, "first")[0] for size, s in searchers.items()}  # builds the index
        for searcher in searchers.values():  # warm-up
            one_candidate(searcher, "warm")
        per_proposal: dict[int, list[float]] = {size: [] for size in sizes}
        proposals = dict.fromkeys(sizes, 0)
        for r in range(rounds):
            for size in sizes[r % len(sizes):] + sizes[:r % len(sizes)]:
                seconds, asked = one_candidate(searchers[size], f"r{r}")
                per_proposal[size].append(seconds / asked)
                proposals[size] += asked
    smallest = sizes[0]
    where = f" in {cache}" if storage == "sqlite" else ""
    print(f"\n{storage} storage{where}, {sampler_name} sampler, {SPACE} under {BUDGET / 1e6:g}M MACs, {rounds} rounds "
          f"(Optuna {optuna.__version__})\n")
    print(f"| trials in the study | ms per proposal (median) | against {smallest:,} trials (median of paired ratios, "
          "IQR) | proposals timed | first proposal (builds the index), ms | one full scan, ms |")
    print("|---:|---:|---|---:|---:|---:|")
    for size in sizes:
        ratios = [b / a for a, b in zip(per_proposal[smallest], per_proposal[size], strict=True)]
        median, low, high = quartiles(ratios)
        print(f"| {size:,} | {statistics.median(per_proposal[size]) * 1000:.2f} | {median:.2f}x ({low:.2f} to "
              f"{high:.2f}) | {proposals[size]} | {first[size] * 1000:.0f} | {scan[size] * 1000:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10_000])
    parser.add_argument("--storage", nargs="+", choices=["memory", "sqlite"], default=["memory", "sqlite"])
    parser.add_argument("--sampler", choices=["random", "tpe"], default="random")
    parser.add_argument("--rounds", type=int, default=30)
    shm = Path("/dev/shm")
    parser.add_argument("--cache", type=Path, default=(shm if shm.is_dir() else Path(tempfile.gettempdir()))
                        / "tokennas-bench-proposals")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"machine: {machine()}; {datetime.date.today().isoformat()}")
    for storage in args.storage:
        measure(sorted(args.sizes), storage, args.sampler, args.rounds, args.cache)
    print("\ngoal: a proposal at 10,000 trials within 2x of one at 100")


if __name__ == "__main__":
    main()
