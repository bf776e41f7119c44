"""What a user can trust in a run's results: each defect of the trust review (issue 20) as a check that failed on
commit e8f8116. Reports are rebuilt by the real `tokennas report` from studies written with Optuna's own API;
searches are real (Ray Tune on the CPU)."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import torch
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from tokennas.cli import main
from tokennas.models.schedule_vit import ScheduleViTConfig
from tokennas.search.settings import SearchSettings, save_settings
from tokennas.spaces import Inputs, Space, register_space

SMALL = ("--train-subset", "300", "--seed", "0", "--quiet")


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "tokennas.cli", *map(str, args)], capture_output=True, text=True,
                          **kwargs)


def config(width: int, depth: int = 2) -> dict[str, Any]:
    return ScheduleViTConfig(img_size=32, in_chans=1, num_classes=10, patch_size=4, embed_dim=width, depth=depth,
                             num_heads=2).to_dict()


def candidate(acc: float, width: int, flops: int, epochs: int = 2) -> optuna.trial.FrozenTrial:
    return create_trial(params={"w": width}, distributions={"w": CategoricalDistribution([32, 48, 64, 96])},
                        values=[acc], constraints={"flops": float(flops - 30_000_000)},
                        user_attrs={"config": config(width), "flops": flops, "params": width * 1000, "val_acc": acc,
                                    "epochs": epochs, "history": [acc] * epochs})


def run(source, seed: int, acc: float | None, epochs: int, stage: str = "retrain", state=TrialState.COMPLETE,
        role: str = "candidate", flops: int = 10_000_000, width: int = 32) -> optuna.trial.FrozenTrial:
    attrs = {"role": role, "stage": stage, "source": source, "seed": seed, "config": config(width), "flops": flops,
             "params": width * 1000, "epochs_planned": epochs,
             "history": [acc or 0.0] * (epochs if state == TrialState.COMPLETE else 1)}
    if state == TrialState.COMPLETE:
        attrs["val_acc"] = acc
    else:
        attrs["interrupted"] = "the search was killed"
    return create_trial(state=state, value=acc if state == TrialState.COMPLETE else None, user_attrs=attrs)


def stored_run(run_dir: Path, candidates: list, runs: list, objective: str = "acc", **settings) -> Path:
    """A run folder as a search leaves it, written with Optuna's API only."""
    run_dir.mkdir()
    save_settings(SearchSettings(space="psvit", flops="30M", objective=objective, **settings), run_dir / "search.yaml")
    url = f"sqlite:///{run_dir / 'study.db'}"
    directions = ["maximize"] if objective == "acc" else ["maximize", "minimize"]
    study = optuna.create_study(storage=url, study_name="tokennas", directions=directions)
    for t in candidates:
        if objective != "acc":
            t.values = [t.values[0], float(t.user_attrs["flops"])]
        study.add_trial(t)
    optuna.create_study(storage=url, study_name="tokennas-runs").add_trials(runs)
    return run_dir


def report(run_dir: Path) -> tuple[str, pd.DataFrame]:
    result = cli("report", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return (run_dir / "summary.md").read_text(), pd.read_csv(run_dir / "ranking.csv")


def test_the_ranking_never_averages_runs_of_different_lengths(tmp_path):
    """A --resume with other --retrain-epochs leaves runs of two lengths; only the asked length counts."""
    run_dir = stored_run(tmp_path / "run", [candidate(0.6, 32, 10_000_000)],
                         [run(0, 1, 0.50, 1), run(0, 2, 0.52, 1), run(0, 1, 0.80, 3), run(0, 2, 0.84, 3)],
                         retrain_top=1, retrain_epochs=3, retrain_seeds=2)
    summary, ranking = report(run_dir)
    top = ranking.iloc[0]
    assert top["val_acc_mean"] == pytest.approx(0.82) and top["seeds"] == 2 and top["retrain_epochs"] == 3
    assert top["seed_list"] == "1 2"
    assert "0.8200" in summary and "2 × 3 epochs (seeds 1 2)" in summary and "0.6600" not in summary
    retrain = pd.read_csv(run_dir / "retrain.csv")
    assert sorted(retrain["epochs_planned"]) == [1, 1, 3, 3]


def test_a_completed_baseline_is_reported_after_an_interrupted_one(tmp_path):
    runs = [run("baseline", 0, None, 2, stage="search", state=TrialState.FAIL, role="baseline"),
            run("baseline", 0, 0.55, 2, stage="search", role="baseline")]
    run_dir = stored_run(tmp_path / "run", [candidate(0.6, 32, 10_000_000)], runs, retrain_top=0)
    baseline = {"config": config(48, 12), "note": ""}
    study = optuna.load_study(storage=f"sqlite:///{run_dir / 'study.db'}", study_name="tokennas")
    study.set_user_attr("baseline", baseline)
    summary, ranking = report(run_dir)
    line = next(line for line in summary.splitlines() if line.startswith("Uniform DeiT-style baseline"))
    assert line.endswith("trained in the search: 0.5500.") and "INTERRUPTED" not in line
    assert ranking[ranking["role"] == "baseline"]["search_val_acc"].iloc[0] == pytest.approx(0.55)


def test_the_baseline_is_no_part_of_the_pareto_front(tmp_path):
    """The re-trained baseline (more accurate and cheaper than the candidate) must not push the candidate off
    the front: the front is of searched candidates; the baseline is a reference."""
    runs = [run(0, 1, 0.60, 1, flops=20_000_000), run("baseline", 1, 0.70, 1, role="baseline", flops=10_000_000)]
    run_dir = stored_run(tmp_path / "run", [candidate(0.6, 32, 20_000_000)], runs, objective="pareto",
                         retrain_top=1, retrain_epochs=1, retrain_seeds=1)
    _, ranking = report(run_dir)
    assert bool(ranking[ranking["role"] == "candidate"]["pareto"].iloc[0])
    assert not bool(ranking[ranking["role"] == "baseline"]["pareto"].iloc[0])


def test_the_summary_says_no_reranking_ran_without_one(tmp_path):
    run_dir = stored_run(tmp_path / "run", [candidate(0.6, 32, 10_000_000)], [], retrain_top=0)
    summary, _ = report(run_dir)
    assert "re-ranking: not asked for (--retrain-top 0)" in summary
    assert "re-ranking: the top" not in summary and "re-ranking asked for" not in summary


def test_a_resume_does_not_apply_the_stored_time_budget_again(tmp_path):
    from tokennas.search.run import resume_settings

    save_settings(SearchSettings(space="psvit", flops="30M", time_budget="30s"), tmp_path / "search.yaml")
    (tmp_path / "study.db").touch()
    assert resume_settings(tmp_path, {}).time_budget is None
    assert resume_settings(tmp_path, {"time_budget": "2m"}).time_budget == "2m"


def test_an_interrupted_rerank_run_resumes_from_its_checkpoint(tmp_path):
    from tokennas.search.stages import make_job

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    runs = optuna.create_study(storage=storage, study_name="tokennas-runs")
    (tmp_path / "ckpt").mkdir()
    cut = run(3, 1, None, 4, state=TrialState.FAIL)
    cut.user_attrs["checkpoint"] = str(tmp_path / "ckpt")
    runs.add_trial(cut)
    job = make_job("candidate", "retrain", 3, 1, config(32), 4, runs)
    assert job["resume_from"] == str(tmp_path / "ckpt")
    assert "resume_from" not in make_job("candidate", "retrain", 3, 1, config(32), 6, runs)  # another length


def test_a_budget_far_above_the_space_keeps_the_baseline_within_the_space():
    from tokennas.flops import count_flops
    from tokennas.search.run import prepare

    prepared = prepare(SearchSettings(space="psvit", flops="1e15", trials=1, train_subset=300))
    built = [prepared.space.build(p, prepared.inputs) for p in prepared.feasible.values()]
    assert count_flops(prepared.baseline) <= max(count_flops(c) for c in built)
    assert prepared.baseline.num_params() <= max(c.num_params() for c in built)  # not a 151M-parameter ViT


def test_an_out_below_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--space", "psvit", "--flops", "30M", "--out", str(tmp_path / "file" / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "is a file" in err and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "mine"


def test_a_password_in_the_query_string_appears_nowhere(tmp_path):
    out = tmp_path / "run"
    result = cli("search", "--space", "psvit", "--flops", "30M", "--trials", "1", *SMALL, "--storage",
                 "postgresql://u@127.0.0.1:1/db?password=s3cret", "--out", out)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "s3cret" not in result.stdout + result.stderr and "127.0.0.1:1" in result.stderr
    assert not out.exists() and not any("s3cret" in p.read_text(errors="ignore")
                                        for p in tmp_path.rglob("*") if p.is_file())


# -- real searches --
class HalfBrokenSpace(Space):
    """Two candidates that train and two that raise inside their Ray trial (three channels on one-channel data)."""

    name = "test-half-broken"
    description = "test only"

    def dimensions(self, inputs: Inputs) -> dict[str, tuple[Any, ...]]:
        return {"embed_dim": (32, 48), "in_chans": (3, 1)}

    def build(self, params: dict[str, Any], inputs: Inputs) -> ScheduleViTConfig:
        return ScheduleViTConfig(img_size=inputs.img_size, in_chans=params["in_chans"], num_classes=inputs.num_classes,
                                 patch_size=8, embed_dim=params["embed_dim"], num_heads=2, depth=2)


@pytest.fixture
def half_broken():
    from tokennas.spaces import SPACES

    register_space(HalfBrokenSpace())
    yield
    SPACES.pop("test-half-broken", None)


@pytest.mark.slow  # about 35 s: a real search with failures and re-ranking
def test_reranking_runs_after_failures_below_the_limit(tmp_path, half_broken):
    """Two failed candidates of --max-failures 3: re-ranking still runs, all of it, and the summary says so. The
    seed is one whose random proposals try both broken candidates before the second good one."""
    from tokennas.search.run import run_search

    settings = SearchSettings(space="test-half-broken", flops="10M", trials=2, epochs=1, train_subset=200,
                              sampler="random", seed=3, max_failures=3, retrain_top=1, retrain_epochs=1,
                              retrain_seeds=1, cpus_per_trial=2.0, scheduler="fifo")
    run_dir = run_search(settings, out=tmp_path / "run", progress=False)
    frame = pd.read_csv(run_dir / "trials.csv")
    assert (frame["state"] == "FAIL").sum() == 2, "precondition: this seed must fail twice"
    retrain = pd.read_csv(run_dir / "retrain.csv")
    assert len(retrain) == 2 and (retrain["state"] == "COMPLETE").all()  # the top 1 and the baseline, 1 seed
    summary = (run_dir / "summary.md").read_text()
    assert "re-ranking: complete: 2 of 2 runs complete" in summary


@pytest.mark.slow  # about 25 s: a real search
def test_outs_that_are_not_plain_names_stay_in_their_folder(tmp_path):
    """`?` would start a URL query and `%41` is a URL escape: the study must be in the run folder all the same."""
    out = tmp_path / "a?b%41c"
    result = cli("search", "--space", "psvit", "--flops", "30M", "--trials", "1", "--epochs", "1", "--retrain-top",
                 "0", *SMALL, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a?b%41c"]
    study = optuna.load_study(storage=f"sqlite:///{out / 'study.db'}".replace("?", "%3F").replace("%41", "%2541"),
                              study_name="tokennas")
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) >= 1


@pytest.mark.slow  # about 35 s: a real search, then a second driver
def test_a_second_driver_with_another_recipe_is_refused(tmp_path):
    journal = f"journal:{tmp_path / 'study.log'}"
    first = cli("search", "--space", "psvit", "--flops", "30M", "--trials", "1", "--epochs", "1", "--retrain-top",
                "0", *SMALL, "--storage", journal, "--out", tmp_path / "a")
    assert first.returncode == 0, first.stderr[-3000:]
    second = cli("search", "--space", "psvit", "--flops", "30M", "--trials", "1", "--epochs", "1", "--retrain-top",
                 "0", *SMALL, "--lr", "0.01", "--storage", journal, "--out", tmp_path / "b")
    assert second.returncode == 2 and second.stderr.count("\n") == 1 and "--lr" in second.stderr, second.stderr
    assert not (tmp_path / "b").exists()


def test_a_oneshot_baseline_the_parent_cannot_hold_is_not_failed_on_every_seed(tmp_path):
    """A parent with 2-pixel patches: the space's uniform baseline (4-pixel patches) cannot take its weights. It is
    named as not evaluated, not counted as failures that stop the search."""
    from tokennas.config import build_model
    from tokennas.train import save_checkpoint

    parent = ScheduleViTConfig(img_size=32, in_chans=1, num_classes=10, patch_size=2, embed_dim=32, depth=2,
                               num_heads=2)
    torch.manual_seed(0)
    save_checkpoint(build_model(parent), parent, tmp_path / "parent.pt")
    run_dir = tmp_path / "run"
    result = cli("search", "--space", "tokens", "--strategy", "oneshot", "--flops", "8M", "--trials", "3",
                 "--parent", tmp_path / "parent.pt", "--score-images", "100", "--retrain-top", "0", *SMALL,
                 "--out", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    frame = pd.read_csv(run_dir / "trials.csv")
    assert not (frame["state"] == "FAIL").any() and not (frame["role"] == "baseline").any()
    summary = (run_dir / "summary.md").read_text()
    assert "Uniform DeiT-style baseline: not evaluated: the supernet cannot hold it" in summary
    assert json.loads(json.dumps(frame["state"].value_counts().to_dict()))["COMPLETE"] == 3


def test_a_rerank_run_of_another_length_is_not_taken_for_a_done_one(tmp_path):
    """After `--resume --retrain-epochs 3`, the 1-epoch run of the same candidate and seed is another job: the
    shared-study check must not withdraw the new run as already done."""
    from tokennas.search.studies import coordination as C

    runs = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="tokennas-runs")
    runs.add_trial(run(3, 1, 0.5, 1))
    again = runs.ask()
    for key, value in {"stage": "retrain", "source": 3, "seed": 1, "epochs_planned": 3}.items():
        again.set_user_attr(key, value)
    assert C.job_taken(runs, again) is None
    same = runs.ask()
    for key, value in {"stage": "retrain", "source": 3, "seed": 1, "epochs_planned": 1}.items():
        same.set_user_attr(key, value)
    assert C.job_taken(runs, same) == 0  # the same length is the same job
