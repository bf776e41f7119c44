"""The layers space on a frozen parent: searched schedules against the published ones, speed, and sampler efficiency.

    python benchmarks/bench_layers.py compare --parent fmnist-vit --shares 50 65 80 --trials 200 --score-images 2000 \
        --seed 0 --finetune-epochs 1 --out-csv benchmarks/layers_compare.csv
    python benchmarks/bench_layers.py differentiable --parent fmnist-vit --shares 50 65 80 \
        --out-csv benchmarks/layers_differentiable.csv
    python benchmarks/bench_layers.py speed --parent fmnist-vit --from-csv benchmarks/layers_compare.csv
    python benchmarks/bench_layers.py ground-truth --parent fmnist-vit --share 50 --n 2000 --score-images 1000 \
        --seed 0 --out benchmarks/ground_truth_layers50.csv
    python benchmarks/bench_layers.py replay --table benchmarks/ground_truth_layers50.csv --seeds 20 --evals 300

``compare``: at each share of the parent's MACs, the best schedule of a layers search (frozen strategy, scored on
validation images) against, within the same MACs and on the same weights: ToMe's constant r (Bolya et al. 2023),
EViT's keep rate at a quarter, half and three quarters of the depth (Liang et al. 2022), HVT's max1d pooling (Pan et al.
2021, class token kept, no stage positional embedding) and the median of 20 random layers schedules (the median by
accuracy on the search's validation images, as a user without the test split would pick it). Every contender is
scored once on the test split; the paired bootstrap interval of (searched - reference) resamples the test images.
Then the searched schedule and ToMe's are fine-tuned from the parent's weights with the same settings and compared
again. ``differentiable``: ``--strategy differentiable`` at each share against compare's searched schedule and
ToMe's, on the test split, with each search's wall time. ``speed``: the compare CSV's schedules timed against the
parent (interleaved, batch 1 and 256).
``ground-truth``: random directions projected onto one budget, each scored on the parent's weights (resumable).
``replay``: Optuna samplers against that table, each proposal answered by its nearest row.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import format_ratio, machine  # noqa: E402

from tokennas import count_flops  # noqa: E402
from tokennas.config import config_from_dict, load_config  # noqa: E402
from tokennas.data import Batches, TensorSplit, load_data  # noqa: E402
from tokennas.flops import parse_budget  # noqa: E402
from tokennas.models.schedule_vit import ScheduleViTConfig  # noqa: E402
from tokennas.models.supernet import build_supernet, load_parent  # noqa: E402
from tokennas.search.strategies.oneshot import scoring_batches  # noqa: E402
from tokennas.spaces import Inputs  # noqa: E402
from tokennas.spaces.hvt import hvt_positions  # noqa: E402
from tokennas.spaces.layers import LayersSpace, tome_schedule  # noqa: E402

RESAMPLES = 2000  # paired bootstrap resamples of the test images
RANDOM_SCHEDULES = 20  # random layers schedules whose median is a reference
MILESTONES = (25, 50, 100, 200, 300)  # replay: evaluations at which the best so far is reported
SAMPLERS = ("random", "tpe", "cmaes", "nsga2")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def header(what: str) -> None:
    print(f"### {what}\n\n{machine()}, {datetime.date.today().isoformat()}\n")


# -- the parent, its budgets and its schedules --
def open_parent(name: str, seed: int, train_subset: int | None = None):
    """The parent's weights as a one-trunk supernet, the layers space's trunk, and Fashion-MNIST at its resolution
    (validation split carved with ``seed``, as the search carves it)."""
    from tokennas.models.supernet import parent_uniform_config

    img_size = parent_uniform_config(name).img_size
    data = load_data("fashion-mnist", None, img_size, train_subset=train_subset, seed=seed, with_test=True)
    parent = load_parent(name, img_size, data.in_chans, data.num_classes)
    if not parent.head_kept:
        raise ValueError(f"--parent {name!r}: its classifier does not fit Fashion-MNIST's 10 classes")
    trunk = parent.trunk.to_dict()
    return trunk, build_supernet([LayersSpace(trunk=trunk).parent()], parent).eval(), data


def budget_of(parent: ScheduleViTConfig, share: float) -> int:
    """``share`` percent of the parent's MACs, as ``tokennas search --flops 50%`` reads it."""
    return parse_budget(f"{share:g}%", count_flops(parent))


def evit_blocks(depth: int) -> list[int]:
    """The blocks that prune in EViT's schedule: a quarter, half and three quarters of the depth (DeiT: 3, 6, 9)."""
    return sorted({depth // 4, depth // 2, 3 * depth // 4})


def evit_schedule(parent: ScheduleViTConfig, budget: int) -> tuple[ScheduleViTConfig | None, float]:
    """EViT (Liang et al. 2022): one keep rate at a quarter, half and three quarters of the depth (DeiT's blocks 3,
    6 and 9), the fused token counted among those kept, as the ``deit_tiny_evit`` preset; the largest rate within
    ``budget`` (bisection: the cost rises with the rate). (None, 0) when even keeping one token is over."""
    steps = evit_blocks(parent.depth)

    def build(rate: float) -> ScheduleViTConfig:
        keep, n = [], parent.grid**2
        for b in range(parent.depth):
            n = max(1, int(rate * n + 0.5)) if b in steps else n
            keep.append(n)
        return parent.replace(reduce_kind="prune", keep_tokens=tuple(keep))

    if count_flops(build(1.0)) <= budget:
        return build(1.0), 1.0
    if count_flops(build(0.0)) > budget:
        return None, 0.0
    lo, hi = 0.0, 1.0  # invariant: lo within the budget, hi over it
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count_flops(build(mid)) <= budget else (lo, mid)
    return build(lo), lo


def hvt_schedule(parent: ScheduleViTConfig, budget: int) -> tuple[ScheduleViTConfig | None, str]:
    """HVT (Pan et al. 2021): max1d pooling (kernel 3, stride 2) where ``hvt_positions`` places it (start 0-2, then
    evenly), on the parent's weights: class token kept, no stage positional embedding (the parent has none). The
    fewest stages within ``budget``, the mildest of those; (None, why) when no placement fits."""
    found = {}
    for stages in range(1, parent.depth):
        for start in (0, 1, 2):
            positions = hvt_positions(parent.depth, start, stages, parent.grid**2)
            if positions:
                config = parent.replace(pool_kind="max1d", pool_after=positions)
                found[positions] = (len(positions), -count_flops(config), config)
    fits = sorted(v for v in found.values() if -v[1] <= budget)
    if fits:
        return fits[0][2], f"max1d pooling after blocks {list(fits[0][2].pool_after)}"
    strongest = min(found.values(), key=lambda v: -v[1])[2] if found else parent
    return None, (f"pooling cannot meet the budget: the most of it (after blocks {list(strongest.pool_after)}) "
                  f"costs {count_flops(strongest) / count_flops(parent):.0%} of the parent")


def random_directions(n: int, depth: int, seed: int) -> list[dict]:
    """``n`` directions drawn uniformly (rates in [0, 1], sharing a fair coin), as Optuna's random sampler draws;
    direction ``i`` depends on ``(seed, i)`` alone, so a longer list starts with the shorter one."""
    directions = []
    for i in range(n):
        rng = np.random.default_rng((seed, i))
        prune, merge, share = rng.random(depth), rng.random(depth), rng.random(depth) < 0.5
        directions.append({**{f"prune{b}": float(prune[b]) for b in range(depth)},
                           **{f"merge{b}": float(merge[b]) for b in range(depth)},
                           **{f"share{b}": bool(share[b]) for b in range(1, depth)}})
    return directions


def tokens_text(config: ScheduleViTConfig) -> str:
    """Patch tokens leaving each block, as the search's report lists them."""
    seen = [t - int(config.class_token) for t in config.tokens_per_block()["tokens"]]
    return " ".join(map(str, seen[1:] + [config.keep_tokens[-1] if config.keep_tokens else seen[-1]]))


# -- test accuracy, per image --
def test_batches(data, n: int | None, img_size: int) -> Batches:
    test = data.test
    n = min(n or len(test), len(test))
    return Batches(TensorSplit(test.images[:n], test.labels[:n]), 256, img_size, device(), shuffle=False,
                   stats=data.stats)


@torch.no_grad()
def correct(model: torch.nn.Module, batches: Batches) -> np.ndarray:
    """Whether each image (in order) is classified right; bf16 autocast on CUDA, as ``evaluate``."""
    model = model.to(batches.device).eval()
    hits = []
    for images, labels in batches:
        with torch.autocast(batches.device.type, dtype=torch.bfloat16, enabled=batches.device.type == "cuda"):
            hits.append((model(images).argmax(-1) == labels).cpu())
    return torch.cat(hits).numpy()


def paired_interval(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Mean of (a - b) over the test images and its paired bootstrap 95% interval (the same resampled image
    indices for both contenders, ``RESAMPLES`` resamples)."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    rng, means = np.random.default_rng(seed), []
    for start in range(0, RESAMPLES, 100):  # 100 resamples at a time: 10,000 images x 100 indices stay small
        means.append(diff[rng.integers(0, len(diff), (min(100, RESAMPLES - start), len(diff)))].mean(axis=1))
    low, high = np.percentile(np.concatenate(means), [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


# -- compare --
def scored_count(run: Path) -> int:
    """Candidates a search run has scored, from its trials.csv (0 when there is none)."""
    if not (run / "trials.csv").is_file():
        return 0
    trials = pd.read_csv(run / "trials.csv")
    return int(((trials["role"] == "candidate") & (trials["state"] == "COMPLETE")).sum())


def run_tokennas(argv: list[str], log: Path, what: str) -> None:
    """``tokennas ARGV`` in this process, its output appended to ``log``; a non-zero exit raises, naming ``what``."""
    from tokennas.cli import main

    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            main(argv)
        except SystemExit as exit_:
            if exit_.code:
                raise RuntimeError(f"{what} failed, see {log}") from None


def searched_schedule(args, share: float, runs: Path) -> tuple[ScheduleViTConfig, str]:
    """The best schedule of ``tokennas search --space layers`` at ``share``; a finished run in ``runs`` is reused, an
    interrupted one resumed. The search's own output goes to ``runs/share{share}.log``."""

    out = runs / f"share{share:g}"
    if scored_count(out) < args.trials:  # not there, or stopped early (an interrupted run exports its best too)
        log = runs / f"share{share:g}.log"
        argv = ["search", "--trials", str(args.trials), "--top", "1", "--quiet"]
        argv += ["--resume", str(out)] if (out / "search.yaml").exists() else [  # an interrupted run continues
            "--space", "layers", "--parent", args.parent, "--flops", f"{share:g}%", "--score-images",
            str(args.score_images), "--seed", str(args.seed), "--out", str(out)]
        run_tokennas(argv, log, f"the search at {share:g}%")
    if scored_count(out) < args.trials:
        raise RuntimeError(f"the search at {share:g}% scored {scored_count(out)} of {args.trials}, see {out}")
    best = sorted((out / "best").glob("01-*.yaml"))[0]
    trials = pd.read_csv(out / "trials.csv")
    scored = trials[(trials["role"] == "candidate") & (trials["state"] == "COMPLETE")]
    return load_config(str(best)), (f"best of {len(scored)} scored (val {scored['val_acc'].max():.4f} on "
                                    f"{args.score_images} images)")


def compare(args) -> None:
    from tokennas.train import TrainSettings, fit

    trunk, net, data = open_parent(args.parent, args.seed, args.train_subset)
    parent = LayersSpace(trunk=trunk).parent()
    batches = test_batches(data, args.test_images, parent.img_size)
    val = scoring_batches(data, args.score_images, parent.img_size, device())  # what the search scores on
    parent_correct = correct(net.child_model(parent), batches)
    runs = Path(args.runs or tempfile.mkdtemp(prefix="bench_layers_"))
    runs.mkdir(parents=True, exist_ok=True)
    header(f"Layers search against published schedules on {args.parent}")
    print(f"Parent test accuracy {parent_correct.mean():.4f} on {len(parent_correct):,} test images, "
          f"{count_flops(parent):,} MACs. Search: {args.trials} trials scored on {args.score_images} validation "
          f"images, seed {args.seed}, runs in {runs}. Intervals: paired bootstrap over the test images, "
          f"{RESAMPLES:,} resamples.\n")
    rows = [{"share": 100.0, "budget": count_flops(parent), "contender": "parent", "stage": "frozen",
             "flops": count_flops(parent), "test_acc": float(parent_correct.mean()), "note": "",
             "config": json.dumps(parent.to_dict())}]
    for share in args.shares:
        budget = budget_of(parent, share)
        space = LayersSpace(trunk=trunk, budget=budget)
        searched, note = searched_schedule(args, share, runs)
        tome = tome_schedule(parent, budget)
        evit, rate = evit_schedule(parent, budget)
        hvt, hvt_note = hvt_schedule(parent, budget)
        contenders = [
            ("searched", searched, note),
            ("ToMe constant r", tome, f"r = {parent.grid**2 - tome.keep_tokens[0]}" if tome and tome.keep_tokens
             else "the parent fits" if tome else "no r meets the budget"),
            ("EViT keep rate", evit, f"rate {rate:.3f} in blocks {evit_blocks(parent.depth)}" if evit
             else "keeping one token in each step is over the budget"),
            ("HVT pooling", hvt, hvt_note),
        ]
        scored = {name: (config, note, correct(net.child_model(config), batches) if config else None)
                  for name, config, note in contenders}
        randoms = []  # ranked on the search's scoring images (validation): the test split is read once, by the median
        for params in random_directions(RANDOM_SCHEDULES, parent.depth, args.seed):
            config = space.build(params, Inputs(parent.img_size, parent.in_chans, parent.num_classes))
            if count_flops(config) <= budget:
                randoms.append((config, correct(net.child_model(config), val).mean()))
        randoms.sort(key=lambda r: r[1])
        accs = [r[1] for r in randoms]
        median = randoms[(len(randoms) - 1) // 2][0] if randoms else None  # the lower middle: a real schedule
        scored["random (median)"] = (median, f"median by validation accuracy of {len(randoms)} of {RANDOM_SCHEDULES} "
                                     "random directions within the budget" +
                                     (f" (val acc {min(accs):.4f} to {max(accs):.4f})" if accs else ""),
                                     correct(net.child_model(median), batches) if median else None)
        frozen = table_rows(share, budget, scored, "frozen")
        print(f"#### {share:g}% of the parent's MACs ({budget:,}), on the parent's weights\n")
        print(markdown(frozen, count_flops(parent)))
        tuned = {}
        if args.finetune_epochs:
            settings = TrainSettings(epochs=args.finetune_epochs, seed=args.seed, lr=args.lr)
            for name in ("searched", "ToMe constant r"):
                config, note, _ = scored[name]
                if config is not None:
                    model, _ = fit(config, data, settings, init=net.child_state_dict(config))
                    tuned[name] = (config, f"fine-tuned {args.finetune_epochs} epoch(s) from the parent",
                                   correct(model, batches))
            finetuned = table_rows(share, budget, tuned, f"finetuned{args.finetune_epochs}")
            print(f"\n{share:g}%, after fine-tuning both for {args.finetune_epochs} epoch(s) from the parent's "
                  f"weights (lr {args.lr}, seed {args.seed}, {len(data.train):,} training images):\n")
            print(markdown(finetuned, count_flops(parent)))
            frozen += finetuned
        print()
        rows += frozen
        if args.out_csv:
            pd.DataFrame(rows).to_csv(args.out_csv, index=False)  # rewritten after each share: partial results
    if args.out_csv:
        print(f"wrote {args.out_csv}")


def table_rows(share, budget, scored, stage) -> list[dict]:
    """One CSV row per contender; the difference is (searched - contender) with its paired interval."""
    rows, mine = [], scored["searched"][2]
    for name, (config, note, hits) in scored.items():
        row = {"share": share, "budget": budget, "contender": name, "stage": stage, "note": note,
               "flops": count_flops(config) if config else None,
               "test_acc": float(hits.mean()) if hits is not None else None,
               "config": json.dumps(config.to_dict()) if config else ""}
        if hits is not None and name != "searched":
            diff, low, high = paired_interval(mine, hits)
            row.update(diff=diff, ci_low=low, ci_high=high, above_zero=low > 0)
        rows.append(row)
    return rows


def markdown(rows: list[dict], parent_flops: int) -> str:
    table = []
    for r in rows:
        config = config_from_dict(json.loads(r["config"])) if r["config"] else None
        table.append({
            "contender": r["contender"],
            "patch tokens leaving each block": tokens_text(config) if config else "-",
            "MACs (% parent)": f"{r['flops']:,} ({r['flops'] / parent_flops:.1%})" if r["flops"] else "-",
            "test acc": f"{r['test_acc']:.4f}" if r["test_acc"] is not None else "-",
            "searched - it (95% CI)": f"{r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
            if "diff" in r else "-",
            "CI above 0": ("yes" if r["above_zero"] else "no") if "diff" in r else "-",
            "note": r["note"]})
    return pd.DataFrame(table).to_markdown(index=False, disable_numparse=True)


# -- the differentiable strategy against the sampler's schedule and ToMe --
def run_wall_seconds(run: Path, pause: float = 300.0) -> float | None:
    """Wall-clock seconds of ``run``'s trials from its study.db (both studies): from the first trial's start to the
    last trial's end, less every gap over ``pause`` seconds between consecutive trial starts (a stopped and resumed
    run's pause). The set-up before the first trial is not counted. None when the run folder is not here."""
    import sqlite3

    if not (run / "study.db").is_file():
        return None
    with contextlib.closing(sqlite3.connect(run / "study.db")) as db:
        starts = [datetime.datetime.fromisoformat(r[0]) for r in
                  db.execute("SELECT datetime_start FROM trials WHERE datetime_start IS NOT NULL ORDER BY 1")]
        last = datetime.datetime.fromisoformat(db.execute("SELECT max(datetime_complete) FROM trials").fetchone()[0])
    gaps = [(b - a).total_seconds() for a, b in zip(starts, starts[1:], strict=False)]
    return (last - starts[0]).total_seconds() - sum(g for g in gaps if g > pause)


def differentiable(args) -> None:
    """At each share: ``tokennas search --strategy differentiable`` (reused when its run folder holds a summary, else
    resumed), its best schedule's test accuracy against the frozen strategy's best and ToMe's constant r from the
    compare CSV (the same test images; paired bootstrap intervals of differentiable minus each), and the wall time
    of each search (this run's own, measured here; the sampler's from its study.db)."""

    table = pd.read_csv(args.from_csv, keep_default_na=False)
    trunk, net, data = open_parent(args.parent, args.seed)
    parent = LayersSpace(trunk=trunk).parent()
    batches = test_batches(data, None, parent.img_size)
    runs = args.runs
    runs.mkdir(parents=True, exist_ok=True)
    header(f"The differentiable strategy against the frozen strategy's best and ToMe on {args.parent}")
    print(f"Test split ({len(batches.split):,} images); intervals: paired bootstrap of (differentiable - contender), "
          f"{RESAMPLES:,} resamples. Differentiable: defaults (`--diff-steps` 200, `--trials` 12 scored on "
          f"{args.score_images} validation images), seed {args.seed}, runs in {runs}.\n")
    rows, out = [], []
    for share in args.shares:
        run, log = runs / f"diff{share:g}", runs / f"diff{share:g}.log"
        timing = runs / f"diff{share:g}.seconds"  # wall seconds of each session of this run, one per line
        if not (run / "summary.md").exists():
            argv = ["search", "--quiet", "--top", "1"] + (["--resume", str(run)] if (run / "search.yaml").exists()
                                                            else ["--space", "layers", "--parent", args.parent,
                                                                  "--flops", f"{share:g}%", "--strategy",
                                                                  "differentiable", "--score-images",
                                                                  str(args.score_images), "--seed", str(args.seed),
                                                                  "--out", str(run)])
            started = time.perf_counter()
            try:
                run_tokennas(argv, log, f"the differentiable search at {share:g}%")
            finally:  # a session that fails or is interrupted still took its time (a resume adds the next one)
                with open(timing, "a") as f:
                    f.write(f"{time.perf_counter() - started:.1f}\n")
        wall = sum(float(x) for x in timing.read_text().split()) if timing.exists() else math.nan
        best = load_config(str(sorted((run / "best").glob("01-*.yaml"))[0]))
        mine = correct(net.child_model(best), batches)
        line = {"share": f"{share:g}%", "contender": "differentiable", "tokens": tokens_text(best),
                "MACs (% parent)": f"{count_flops(best) / count_flops(parent):.1%}", "test acc": f"{mine.mean():.4f}",
                "differentiable - it (95% CI)": "",
                "search wall time": "not recorded" if math.isnan(wall) else f"{wall / 60:.0f} min"}
        out.append(line)
        rows.append({"share": share, "contender": "differentiable", "flops": count_flops(best),
                     "test_acc": float(mine.mean()), "wall_seconds": wall, "config": json.dumps(best.to_dict())})
        for name in ("searched", "ToMe constant r"):
            match = table[(table["share"].astype(float) == share) & (table["contender"] == name)
                          & (table["stage"] == "frozen")]
            if match.empty:
                raise ValueError(f"{args.from_csv} has no frozen {name!r} row at {share:g}%")
            config = config_from_dict(json.loads(match["config"].iloc[0]))
            hits = correct(net.child_model(config), batches)
            diff, low, high = paired_interval(mine, hits)
            label = "frozen strategy's best" if name == "searched" else name
            wall_other = run_wall_seconds(args.compare_runs / f"share{share:g}") if name == "searched" else None
            out.append({"share": f"{share:g}%", "contender": label, "tokens": tokens_text(config),
                        "MACs (% parent)": f"{count_flops(config) / count_flops(parent):.1%}",
                        "test acc": f"{hits.mean():.4f}",
                        "differentiable - it (95% CI)": f"{diff:+.4f} [{low:+.4f}, {high:+.4f}]",
                        "search wall time": "" if name != "searched" else "not here (--compare-runs)"
                        if wall_other is None else f"{wall_other / 60:.0f} min (its trials, pauses left out)"})
            rows.append({"share": share, "contender": label, "flops": count_flops(config),
                         "test_acc": float(hits.mean()), "diff": diff, "ci_low": low, "ci_high": high,
                         "wall_seconds": wall_other, "config": json.dumps(config.to_dict())})
        if args.out_csv:
            pd.DataFrame(rows).to_csv(args.out_csv, index=False)
    print(pd.DataFrame(out).to_markdown(index=False, disable_numparse=True))


# -- speed --
def speed(args) -> None:
    from tokennas.speed import throughput_against

    table = pd.read_csv(args.from_csv, keep_default_na=False)
    trunk, net, _ = open_parent(args.parent, 0)
    parent = LayersSpace(trunk=trunk).parent()
    reference = net.child_model(parent)
    if args.threads:
        torch.set_num_threads(args.threads)
    header(f"Measured speed against {args.parent}, interleaved")
    print(f"Batch sizes {args.batches}, {args.rounds} rounds (5x at batch <= 8), on {args.device}, {args.clock} clock, "
          f"torch on {torch.get_num_threads()} thread(s); "
          "speed-up = parent's seconds / schedule's seconds per batch, median of paired rounds.\n")
    out = []
    for share, group in table[(table["contender"] != "parent") & (table["stage"] == "frozen")
                              & (table["config"] != "")].groupby("share", sort=True):
        models = {row.contender: net.child_model(config_from_dict(json.loads(row.config)))
                  for row in group.itertuples()}
        flops = dict(zip(group["contender"], group["flops"], strict=True))
        measured = throughput_against(reference, models, parent.img_size, parent.in_chans, tuple(args.batches),
                                      args.rounds, args.device, args.clock)
        for name in models:
            share_of_parent = float(flops[name]) / count_flops(parent)
            line = {"share": f"{share:g}%", "contender": name, "MACs (% parent)": f"{share_of_parent:.1%}"}
            slower = []
            for r in (r for r in measured if r["name"] == name):
                line[f"batch {r['batch']}"] = format_ratio((r["speedup"], r["speedup_q1"], r["speedup_q3"]),
                                                           r["rounds"])
                line[f"images/s at {r['batch']}"] = f"{r['images_per_s']:,.0f} (parent " \
                                                     f"{r['reference_images_per_s']:,.0f})"
                if r["speedup"] < 1:  # by the median, as the search's report flags; unclear when the IQR spans 1
                    slower.append(f"{r['batch']}{' (IQR spans 1)' if r['speedup_q3'] >= 1 else ''}")
            line["flag"] = f"SLOWER than the parent at batch {', '.join(slower)}" if slower else ""
            out.append(line)
    print(pd.DataFrame(out).to_markdown(index=False, disable_numparse=True))


# -- ground truth --
def ground_truth(args) -> None:
    from tokennas.search.strategies.oneshot import score, scoring_batches

    trunk, net, data = open_parent(args.parent, args.seed)
    parent = LayersSpace(trunk=trunk).parent()
    budget = budget_of(parent, args.share)
    space, inputs = LayersSpace(trunk=trunk, budget=budget), Inputs(parent.img_size, parent.in_chans,
                                                                   parent.num_classes)
    val = scoring_batches(data, args.score_images, parent.img_size, device())
    net.to(device())
    directions = random_directions(args.n, parent.depth, args.seed)  # all drawn first: row i is the same on resume
    done = set()
    if args.out.exists():
        old = pd.read_csv(args.out)
        first = old.iloc[0]
        if first["budget"] != budget or not np.isclose(first["prune0"], directions[int(first["row"])]["prune0"]):
            raise ValueError(f"{args.out} holds another table (other --share, --seed or --parent); give another --out")
        done = set(old["row"])
    todo = [i for i in range(args.n) if i not in done]
    print(f"{args.n} directions at {args.share:g}% ({budget:,} MACs), {len(done)} done, {len(todo)} to go; scored "
          f"on the first {len(val.split)} validation images (seed {args.seed}) on {machine()}", flush=True)
    started = time.perf_counter()
    for k, i in enumerate(todo, start=1):
        config, t0 = space.build(directions[i], inputs), time.perf_counter()
        flops = count_flops(config)
        row = {"row": i, **directions[i], "budget": budget, "flops": flops,
               "flops_pct": round(100 * flops / count_flops(parent), 2), "feasible": flops <= budget,
               "val_acc": score(net, config, val), "seconds": round(time.perf_counter() - t0, 3),
               "config": json.dumps(config.to_dict())}
        pd.DataFrame([row]).to_csv(args.out, mode="a", header=not args.out.exists(), index=False)
        if k % args.every == 0 or k == len(todo):
            rate = (time.perf_counter() - started) / k
            print(f"{len(done) + k}/{args.n}: row {i} val_acc {row['val_acc']:.4f} ({rate:.2f}s a row, "
                  f"{rate * (len(todo) - k) / 60:.1f} min left)", flush=True)


# -- replay --
def replay(args) -> None:
    import optuna

    from tokennas.search.studies.study import make_sampler, record_cost, tell_infeasible

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    table = pd.read_csv(args.table)
    depth = sum(c.startswith("prune") for c in table.columns)
    space = LayersSpace(trunk={"depth": depth})
    dims = space.dimensions(Inputs())
    distributions = {name: optuna.distributions.CategoricalDistribution(list(bounds)) if name.startswith("share")
                     else optuna.distributions.FloatDistribution(*bounds) for name, bounds in dims.items()}
    rows = direction_vectors(table[list(dims)].to_dict("records"), depth)
    values = np.where(table["feasible"].astype(bool), table["val_acc"], 0.0)
    configs: dict[int, ScheduleViTConfig] = {}
    curves: dict[str, np.ndarray] = {}
    repeats: dict[str, float] = {}
    distances: dict[str, float] = {}
    for name in SAMPLERS:
        runs, seen, dist = [], [], []
        for seed in range(args.seeds):
            study = optuna.create_study(direction="maximize", sampler=make_sampler(name, seed, args.evals))
            if name != "random":  # as the frozen strategy does: the space's hand-set directions first
                for params in space.starts(Inputs()).values():
                    study.enqueue_trial(params)
            hits = []
            for _ in range(args.evals):
                trial = study.ask(distributions)
                gaps = np.linalg.norm(rows - direction_vectors([trial.params], depth)[0], axis=1)
                i = int(gaps.argmin())
                config = configs.setdefault(i, config_from_dict(json.loads(table["config"][i])))
                if record_cost(trial, config, int(table["flops"][i]), int(table["budget"][i])):
                    study.tell(trial, float(values[i]))
                else:
                    tell_infeasible(study, trial, int(table["flops"][i]))
                hits.append(i)
                dist.append(gaps[i])
            runs.append(np.maximum.accumulate(values[hits]))
            seen.append(1 - len(set(hits)) / len(hits))
        curves[name], repeats[name], distances[name] = np.array(runs), float(np.mean(seen)), float(np.median(dist))
    target = float(np.median(curves["random"][:, -1]))
    pairs = np.random.default_rng(0).integers(0, len(rows), (2, 1000))
    apart = float(np.median(np.linalg.norm(rows[pairs[0]] - rows[pairs[1]], axis=1)))
    marks = [m for m in MILESTONES if m < args.evals] + [args.evals]
    header("Sampler efficiency on the layers ground-truth table (replayed)")
    print(f"Table {args.table}: {len(table):,} random directions, best val_acc {values.max():.4f}, median "
          f"{np.median(values):.4f}. Each proposal is answered by the table row NEAREST to it (Euclidean distance "
          "between directions, each normalised by its largest rate, shares as 0/1) with that row's val_acc: an "
          "approximation of the live search, which would score the proposal's own schedule. "
          f"{args.seeds} seeds per sampler, {args.evals} evaluations; medians over seeds; every sampler but random "
          "starts from the space's hand-set directions, as the search does. Target: random's median "
          f"best after {args.evals}, {target:.4f}.\n")
    out = []
    for name, runs in curves.items():
        line = {"sampler": name}
        line.update({f"best @ {m}": f"{np.median(runs[:, m - 1]):.4f}" for m in marks})
        reach = [int(np.argmax(r >= target)) + 1 if r[-1] >= target else math.inf for r in runs]
        needed = float(np.median(reach))
        line[f"evals to reach {target:.4f}"] = ("not reached" if math.isinf(needed) else f"{needed:g}") + \
            f" ({sum(not math.isinf(r) for r in reach)}/{len(reach)} seeds reach it)"
        line["repeated rows"] = f"{repeats[name]:.0%}"
        line["median distance to row"] = f"{distances[name]:.3f}"
        out.append(line)
    print(pd.DataFrame(out).to_markdown(index=False, disable_numparse=True))
    print(f"\nmedian distance to row: from a proposal to the row that answers it; two random rows of the table are "
          f"{apart:.3f} apart (median). repeated rows: the share of a run's proposals answered by a row it already "
          "had.")
    if args.live:
        live_runs(args.live, values, target, marks, args.evals, len(space.starts(Inputs())))


def reach_at(curve: np.ndarray, target: float) -> float:
    """The evaluations a best-so-far ``curve`` needs to reach ``target`` (inf when it does not)."""
    return int(np.argmax(curve >= target)) + 1 if curve[-1] >= target else math.inf


def live_runs(runs: list[Path], values: np.ndarray, target: float, marks: list[int], evals: int, starts: int) -> None:
    """Searches that scored their own proposals (``tokennas search --space layers`` on the same validation images as
    the table) against random search drawn from the table without replacement (each of 1,000 draws: ``evals``
    rows in a random order), which is random search run live: the table's rows are random directions, each scored
    on the parent."""
    rng = np.random.default_rng(0)
    draws = np.array([np.maximum.accumulate(values[rng.permutation(len(values))[:evals]]) for _ in range(1000)])
    print(f"\nLive searches against random search drawn from the table ({len(values):,} rows, 1,000 draws of {evals} "
          f"without replacement; median best after {evals}: {np.median(draws[:, -1]):.4f}). Target as above, "
          f"{target:.4f}. A live search scores its own proposals; the samplers but random begin with the space's "
          f"{starts} hand-set directions.\n")
    out = [{"search": "random, drawn from the table (median of 1,000 draws)",
            **{f"best @ {m}": f"{np.median(draws[:, m - 1]):.4f}" for m in marks},
            "evals to reach the target": f"{np.median([reach_at(d, target) for d in draws]):g}",
            "best of the hand-set starts": "-"}]
    for run in runs:
        trials = pd.read_csv(run / "trials.csv")
        scored = trials[(trials["role"] == "candidate") & (trials["state"] == "COMPLETE")].sort_values("number")
        curve = np.maximum.accumulate(scored["val_acc"].to_numpy())
        settings = (run / "search.yaml").read_text()
        sampler = next((line.split(":", 1)[1].strip() for line in settings.splitlines()
                        if line.startswith("sampler:")), "?")
        seed = next((line.split(":", 1)[1].strip() for line in settings.splitlines() if line.startswith("seed:")), "?")
        reach = int(np.argmax(curve >= target)) + 1 if curve[-1] >= target else None
        out.append({"search": f"{sampler}, seed {seed}, live ({run})",
                    **{f"best @ {m}": f"{curve[m - 1]:.4f}" if m <= len(curve) else "-" for m in marks},
                    "evals to reach the target": str(reach) if reach else f"not reached in {len(curve)}",
                    "best of the hand-set starts": f"{curve[min(starts, len(curve)) - 1]:.4f}"
                    if sampler != "random" else "-"})
    print(pd.DataFrame(out).to_markdown(index=False, disable_numparse=True))


def direction_vectors(params: list[dict], depth: int) -> np.ndarray:
    """Directions as points: prune and merge rates divided by the direction's largest (one ray, one point), then the
    sharing flags as 0/1."""
    rates = np.array([[p.get(f"prune{b}", 0.0) for b in range(depth)] + [p.get(f"merge{b}", 0.0)
                                                                        for b in range(depth)] for p in params])
    largest = rates.max(axis=1, keepdims=True)
    rates = np.divide(rates, largest, out=np.zeros_like(rates), where=largest > 0)
    shares = np.array([[float(bool(p.get(f"share{b}", False))) for b in range(1, depth)] for p in params])
    return np.hstack([rates, shares.reshape(len(params), depth - 1)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("compare", help="searched schedule against ToMe, EViT, HVT and random, on the test split")
    c.add_argument("--parent", default="fmnist-vit")
    c.add_argument("--shares", type=float, nargs="+", default=[50, 65, 80], help="percent of the parent's MACs")
    c.add_argument("--trials", type=int, default=200)
    c.add_argument("--score-images", type=int, default=2000)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--finetune-epochs", type=int, default=1, help="0: no fine-tuning")
    c.add_argument("--lr", type=float, default=5e-4,
                   help="fine-tuning learning rate at batch 128 (a sixth of the from-scratch 3e-3)")
    c.add_argument("--train-subset", type=int, default=None, help="fine-tune on the first N training images")
    c.add_argument("--test-images", type=int, default=None, help="the first N test images (default: all 10,000)")
    c.add_argument("--runs", type=Path, default=None, help="search run folders, reused when finished [default: tmp]")
    c.add_argument("--out-csv", type=Path, default=None)
    d = commands.add_parser("differentiable", help="--strategy differentiable against compare's searched and ToMe")
    d.add_argument("--parent", default="fmnist-vit")
    d.add_argument("--shares", type=float, nargs="+", default=[50, 65, 80])
    d.add_argument("--score-images", type=int, default=2000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--from-csv", type=Path, default=Path(__file__).parent / "layers_compare.csv")
    d.add_argument("--compare-runs", type=Path, default=Path("results/bench-layers/runs"),
                   help="compare's search runs, for the sampler's wall time")
    d.add_argument("--runs", type=Path, default=Path("results/bench-layers/runs"))
    d.add_argument("--out-csv", type=Path, default=None)
    s = commands.add_parser("speed", help="the compare CSV's schedules timed against the parent")
    s.add_argument("--parent", default="fmnist-vit")
    s.add_argument("--from-csv", type=Path, required=True)
    s.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    s.add_argument("--rounds", type=int, default=7)
    s.add_argument("--device", default="cpu")
    s.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time (a shared machine; with --threads 1, latency on a quiet one)")
    s.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    g = commands.add_parser("ground-truth", help="random directions scored on the parent's weights (resumable)")
    g.add_argument("--parent", default="fmnist-vit")
    g.add_argument("--share", type=float, default=50)
    g.add_argument("--n", type=int, default=2000)
    g.add_argument("--score-images", type=int, default=1000)
    g.add_argument("--seed", type=int, default=0, help="seeds the directions and the validation split")
    g.add_argument("--every", type=int, default=25, help="print progress every N rows")
    g.add_argument("--out", type=Path, default=Path(__file__).parent / "ground_truth_layers50.csv")
    r = commands.add_parser("replay", help="Optuna samplers against the ground-truth table (nearest row)")
    r.add_argument("--table", type=Path, default=Path(__file__).parent / "ground_truth_layers50.csv")
    r.add_argument("--live", type=Path, nargs="*", default=[],
                   help="run folders of layers searches scored on the table's validation images, compared live")
    r.add_argument("--seeds", type=int, default=20)
    r.add_argument("--evals", type=int, default=300)
    args = parser.parse_args(argv)
    commands = {"compare": compare, "differentiable": differentiable, "speed": speed, "ground-truth": ground_truth,
                "replay": replay}
    commands[args.command](args)


if __name__ == "__main__":
    main()
