"""The layers space (per-block prune/merge schedules of a parent, projected onto the budget), percent budgets, the
frozen strategy end to end on a tiny trained parent, and the measured speed in its report."""

import json
import random

import optuna
import pandas as pd
import pytest
import torch
from conftest import TINY_TRUNK

from tokennas import count_flops
from tokennas.cli import main
from tokennas.config import load_config
from tokennas.flops import flops_by_module, parse_budget
from tokennas.models.schedule_vit import ScheduleViTConfig
from tokennas.spaces import Inputs
from tokennas.spaces.layers import LayersSpace, tome_schedule
from tokennas.speed import throughput_against

TRUNK = TINY_TRUNK  # the trunk of conftest's tiny_parent
INPUTS = Inputs(16, 1, 10)


def parent_macs() -> int:
    return count_flops(ScheduleViTConfig(**TRUNK))


def random_params(rng: random.Random, depth: int) -> dict:
    params = {}
    for b in range(depth):
        params[f"prune{b}"] = rng.random() if rng.random() < 0.6 else 0.0
        params[f"merge{b}"] = rng.random() if rng.random() < 0.6 else 0.0
        if b:
            params[f"share{b}"] = rng.random() < 0.3
    return params


@pytest.mark.parametrize("share", [0.3, 0.5, 0.8])
def test_every_proposal_is_projected_onto_the_budget_and_monotone(share):
    budget = int(share * parent_macs())
    space = LayersSpace(trunk=TRUNK, budget=budget)
    rng = random.Random(0)
    costs = []
    for _ in range(40):
        params = random_params(rng, TRUNK["depth"])
        if not any(params[f"{k}{b}"] for k in ("prune", "merge") for b in range(TRUNK["depth"])):
            continue
        config = space.build(params, INPUTS)
        tokens = config.tokens_per_block()["tokens"]
        assert list(tokens) == sorted(tokens, reverse=True)  # monotone
        cost = count_flops(config)
        if cost <= budget:  # a direction that cannot reach the budget gives its strongest schedule (infeasible)
            costs.append(cost / budget)
    # the mildest schedule of its direction: within the budget and close to it (one token is ~1/64 of a block)
    assert len(costs) >= 20 and min(costs) > 0.9 and max(costs) <= 1.0


def test_the_closed_form_equals_the_fvcore_trace_on_layers_schedules():
    space = LayersSpace(trunk=TRUNK, budget=int(0.5 * parent_macs()))
    rng = random.Random(1)
    for _ in range(6):
        config = space.build(random_params(rng, TRUNK["depth"]), INPUTS)
        assert flops_by_module(config, "fvcore") == flops_by_module(config, "analytic")


def test_tome_reference_is_the_smallest_constant_r_within_the_budget():
    parent = ScheduleViTConfig(**TRUNK)
    budget = int(0.6 * parent_macs())
    config = tome_schedule(parent, budget)
    r = 64 - config.keep_tokens[0]
    assert count_flops(config) <= budget and r >= 1
    assert list(config.keep_tokens[:2]) == [64 - r, 64 - 2 * r]
    milder = tome_schedule(parent, count_flops(config) + 0)  # the same r is found again at its own cost
    assert milder == config
    keep, n = [], 64
    for _ in range(TRUNK["depth"]):
        n = max(1, n - min(r - 1, (n + 1) // 2))
        keep.append(n)
    assert count_flops(parent.replace(keep_tokens=tuple(keep))) > budget  # r - 1 does not fit
    assert tome_schedule(parent, parent_macs()) == parent  # the parent itself fits a 100% budget


def test_percent_budgets_need_a_reference():
    assert parse_budget("50%", 1000) == 500
    assert parse_budget("30M") == 30_000_000
    for bad in ("0%", "150%", "x%"):
        with pytest.raises(ValueError, match="invalid FLOPs budget"):
            parse_budget(bad, 1000)
    with pytest.raises(ValueError, match="needs the parent"):
        parse_budget("50%")


@pytest.mark.parametrize("sampler", ["cmaes", "tpe", "random"])
def test_optuna_samplers_propose_layers_schedules(sampler):
    """CMA-ES models the continuous rates (its proposals after start-up are relative samples, not independent
    draws); every sampler's schedules stay within the budget."""
    from tokennas.search.studies.study import make_sampler

    budget = int(0.5 * parent_macs())
    space = LayersSpace(trunk=TRUNK, budget=budget)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(sampler, 0, 30))
    for _ in range(16):
        trial = study.ask()
        config = space.suggest(trial, INPUTS)
        # a made-up objective: keep tokens in the first blocks
        study.tell(trial, -sum(trial.params[f"prune{b}"] for b in range(2)) if count_flops(config) <= budget else -9)
    values = [t.params["prune0"] for t in study.trials]
    assert len(set(values)) == 16 and all(0 <= v <= 1 for v in values)
    if sampler == "cmaes":  # past its start-up, CMA-ES's own generations propose (relative sampling), not a fallback
        assert any("cma:generation" in t.system_attrs for t in study.trials[-4:])


def test_throughput_against_a_reference_is_measured_per_batch():
    parent = load_config("deit_tiny").replace(img_size=16, patch_size=4, in_chans=1, embed_dim=32, num_heads=1,
                                              depth=2)
    from tokennas.config import build_model

    small = parent.replace(reduce_kind="merge", keep_tokens=(8, 4))
    # a contender may be called "reference" (the search's ToMe schedule): it is still timed against the parent
    rows = throughput_against(build_model(parent), {"small": build_model(small), "reference": build_model(parent)},
                              16, 1, (1, 4), rounds=3)
    assert [(r["name"], r["batch"]) for r in rows] == [("small", 1), ("reference", 1), ("small", 4), ("reference", 4)]
    assert all(r["speedup"] > 0 and r["images_per_s"] > 0 and r["rounds"] >= 3 for r in rows)
    # the parent against itself: the paired ratios straddle 1 (not the contender's own step timed twice)
    same = [r for r in rows if r["name"] == "reference"]
    assert all(r["images_per_s"] != r["reference_images_per_s"] for r in same)


def main_ok(argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0


def test_a_layers_search_on_a_frozen_parent(tiny_parent, tmp_path, capsys):
    """`--space layers` needs no --strategy: schedules are scored on the parent's weights, every one within 50% of
    its MACs, the reference is ToMe's constant r, the exported schedules are timed against the parent, and
    `tokennas evaluate` runs an exported schedule on the parent."""
    run_dir = tmp_path / "run"
    main_ok(["search", "--space", "layers", "--parent", str(tiny_parent), "--flops", "50%", "--trials", "6",
             "--top", "2", "--seed", "0", "--quiet", "--out", str(run_dir)])
    budget = parent_macs() // 2
    assert "score_images: 1000\n" in (run_dir / "search.yaml").read_text()  # the frozen strategy's default
    frame = pd.read_csv(run_dir / "trials.csv")
    scored = frame[(frame["role"] == "candidate") & (frame["state"] == "COMPLETE")]
    assert len(scored) == 6 and (scored["flops"] <= budget).all() and scored["val_acc"].between(0, 1).all()
    assert frame[frame["role"] == "baseline"]["state"].tolist() == ["COMPLETE"]
    best = sorted((run_dir / "best").glob("*.yaml"))
    assert len(best) == 2 and all(count_flops(load_config(p)) <= budget for p in best)
    summary = (run_dir / "summary.md").read_text()
    assert "frozen parent" in summary and "on the first 1000 validation images" in summary
    assert "ToMe's constant r" in summary and "against the reference" in summary
    assert "speed at batch 1" in summary and "speed at batch 256" in summary
    assert "re-ranking: not asked for (no --finetune-epochs" in summary
    assert "hand-set directions" in summary  # the sampler starts from the space's published rules, in order
    starts = list(LayersSpace(trunk=TRUNK, budget=budget).starts(INPUTS).values())
    rates = [f"{k}{b}" for k in ("prune", "merge") for b in range(TRUNK["depth"])]
    first = frame[frame["role"] == "candidate"].sort_values("number").head(len(starts))  # some may be over budget
    assert [[row[f"param_{r}"] for r in rates] for _, row in first.iterrows()] == [[p[r] for r in rates]
                                                                                    for p in starts]
    main_ok(["search", "--resume", str(run_dir), "--trials", "9", "--quiet"])  # extends the search: 3 more
    frame = pd.read_csv(run_dir / "trials.csv")
    assert ((frame["role"] == "candidate") & (frame["state"] == "COMPLETE")).sum() == 9
    timed = [line.split(" | ")[0].strip("| ") for line in (run_dir / "summary.md").read_text().splitlines()
             if line.startswith("| trial ") or line.startswith("| reference ")]
    best = sorted((run_dir / "best").glob("*.yaml"))
    assert set(timed) == {f"trial {p.name.split('-')[1][5:]}" for p in best} | {"reference"}  # the new top, timed
    # every candidate is scored, but a larger --top has schedules nobody timed: the stage is not done until they are
    main_ok(["search", "--resume", str(run_dir), "--top", "4", "--quiet"])
    timed = [line.split(" | ")[0].strip("| ") for line in (run_dir / "summary.md").read_text().splitlines()
             if line.startswith("| trial ") or line.startswith("| reference ")]
    best = sorted((run_dir / "best").glob("*.yaml"))
    assert len(best) == 4 and set(timed) == {f"trial {p.name.split('-')[1][5:]}" for p in best} | {"reference"}
    assert "- search stage: complete: 9 candidates evaluated" in (run_dir / "summary.md").read_text()
    capsys.readouterr()
    main_ok(["evaluate", str(best[0]), "--parent", str(tiny_parent), "--split", "test", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["flops"] == count_flops(load_config(best[0])) and 0 <= result["acc"] <= 1
    assert result["split"] == "test" and result["images"] == 10000


def test_layers_needs_a_parent_and_percent_needs_one(tmp_path, capsys):
    for argv, message in (
        (["--space", "layers", "--flops", "10M"], "needs --parent"),
        (["--space", "psvit", "--flops", "50%"], "needs the parent"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["search", *argv, "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and err.count("\n") == 1
        assert not (tmp_path / "run").exists()


@pytest.mark.slow  # 40 s: two more searches (the samplers' proposals are checked without Ray above)
def test_cmaes_and_nsga2_drive_a_layers_search(tiny_parent, tmp_path):
    """CMA-ES over the rates, and NSGA-II with --objective pareto, end in whole run folders."""
    for sampler, objective in (("cmaes", "acc"), ("nsga2", "pareto")):
        run_dir = tmp_path / sampler
        main_ok(["search", "--space", "layers", "--parent", str(tiny_parent), "--flops", "40%", "--trials", "5",
                 "--sampler", sampler, "--objective", objective, "--score-images", "200", "--top", "1", "--quiet",
                 "--out", str(run_dir)])
        frame = pd.read_csv(run_dir / "trials.csv")
        assert ((frame["role"] == "candidate") & (frame["state"] == "COMPLETE")).sum() == 5
        assert (run_dir / "report.html").is_file() and list((run_dir / "best").glob("01-*.yaml"))


def test_a_schedule_runs_the_parents_weights_unchanged(tiny_parent):
    """The layers space keeps the parent's weights: a schedule that removes nothing gives the parent's logits."""
    from tokennas.models.supernet import build_supernet, load_parent

    parent = load_parent(str(tiny_parent), 16, 1, 10)
    space = LayersSpace(trunk=TRUNK, budget=10 * parent_macs())
    identity = space.build({}, INPUTS)
    net = build_supernet([space.parent()], parent)
    images = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(net.child_model(identity).eval()(images), net.child_model(space.parent()).eval()(images))


def test_a_parent_is_only_scored_on_images_it_never_trained_on(tiny_parent, tmp_path, capsys):
    """`tokennas train` records the validation split its weights were held out from; a search or `evaluate --split
    val` with another --seed (whose validation split holds training images of the parent) is refused in one line,
    and a second schedule (--init) under another seed leaves no validation split held out."""
    for argv in (["search", "--space", "layers", "--parent", str(tiny_parent), "--flops", "50%", "--trials", "2",
                  "--seed", "1", "--quiet", "--out", str(tmp_path / "run")],
                 ["evaluate", str(tiny_parent), "--split", "val", "--seed", "1"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1
        assert "invalid --seed 1" in err and "outside the validation split of seed 0" in err
    assert not (tmp_path / "run").exists()
    main_ok(["evaluate", str(tiny_parent), "--split", "test", "--seed", "1", "--images", "50"])  # the test split: fine
    again = tmp_path / "again"
    main_ok(["train", str(tiny_parent.parent.parent / "vit.yaml"), "--epochs", "1", "--train-subset", "100",
             "--init", str(tiny_parent), "--seed", "1", "--out", str(again)])
    capsys.readouterr()
    for seed in ("0", "1"):
        with pytest.raises(SystemExit) as exit_:
            main(["evaluate", str(again / "checkpoint.pt"), "--split", "val", "--seed", seed])
        assert exit_.value.code == 2 and "more than one validation split" in capsys.readouterr().err


def test_sampler_seed_repeats_a_search_on_a_parent_with_other_proposals(tiny_parent, tmp_path):
    """The parent's split fixes --seed; --sampler-seed seeds the proposals alone: another draw of schedules, scored on
    the same validation images (the reference scores the same), recorded in search.yaml and the summary."""
    runs = {}
    for name, extra in (("plain", []), ("other", ["--sampler-seed", "7"])):
        runs[name] = tmp_path / name
        main_ok(["search", "--space", "layers", "--parent", str(tiny_parent), "--flops", "50%", "--trials", "2",
                 "--sampler", "random", "--score-images", "200", "--top", "1", "--seed", "0", *extra, "--quiet",
                 "--out", str(runs[name])])
    frames = {name: pd.read_csv(run / "trials.csv") for name, run in runs.items()}
    rates = [f"param_{k}{b}" for k in ("prune", "merge") for b in range(TRUNK["depth"])]
    first = {name: frame[frame["role"] == "candidate"].sort_values("number")[rates].iloc[0].tolist()
             for name, frame in frames.items()}
    assert first["plain"] != first["other"]
    references = {name: frame.loc[frame["role"] == "baseline", "val_acc"].tolist() for name, frame in frames.items()}
    assert references["plain"] == references["other"] and len(references["plain"]) == 1
    assert "sampler_seed: 7\n" in (runs["other"] / "search.yaml").read_text()
    assert "seed: 0, sampler seed: 7" in (runs["other"] / "summary.md").read_text()
    assert "sampler seed" not in (runs["plain"] / "summary.md").read_text()


@pytest.mark.parametrize("option,value", [("--sampler-seed", "-1"), ("--seed", "-1"), ("--sampler-seed", "2147483648")])
def test_a_seed_out_of_range_is_one_line_and_writes_nothing(option, value, tmp_path, capsys):
    """Optuna takes seeds from 0 to 2**32 - 1, after the search adds its offsets: a seed outside 0..2**31 - 1 is
    refused before the run folder exists."""
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--space", "psvit", "--flops", "30M", option, value, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert f"invalid {option} {value}; expected an integer from 0 to 2147483647" in err
    assert not (tmp_path / "run").exists()
