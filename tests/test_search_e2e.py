"""End-to-end searches through the real CLI: Optuna, Ray Tune on the CPU, Fashion-MNIST, reports."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
import torch
import yaml

from tokennas.cli import main
from tokennas.search.studies import study as S

OUTPUTS = ("trials.csv", "pareto.png", "report.html", "summary.md", "study.db", "search.yaml")
QUICK = ("--trials", "2", "--epochs", "1", "--train-subset", "500", "--seed", "0", "--retrain-top", "0", "--quiet")
RERANK = ("--trials", "2", "--epochs", "2", "--train-subset", "500", "--seed", "0", "--retrain-top", "1",
          "--retrain-epochs", "1", "--retrain-seeds", "2", "--scheduler", "fifo", "--quiet")


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "tokennas.cli", *map(str, args)], capture_output=True, text=True,
                          **kwargs)


def trained_configs(run_dir):
    study = optuna.load_study(storage=f"sqlite:///{run_dir / 'study.db'}", study_name="tokennas")
    return [json.dumps(t.user_attrs["config"], sort_keys=True) for t in study.trials if S.trained(t)]


def check_run(run_dir, budget, trials):
    for name in OUTPUTS:
        assert (run_dir / name).is_file(), name
    frame = pd.read_csv(run_dir / "trials.csv")
    complete = frame[(frame["state"] == "COMPLETE") & (frame["role"] == "candidate")]
    assert len(complete) == trials and complete["number"].is_unique
    configs = trained_configs(run_dir)
    assert len(configs) == len(set(configs))  # no config trained twice, whatever parameters built it
    assert (complete["flops"] <= budget).all()
    best = sorted((run_dir / "best").glob("*.yaml"))
    assert best and best[0].name.startswith("01-")
    recorded = dict(zip(complete["number"], complete["flops"], strict=True))
    for path in best:
        number = int(path.name.split("-")[1].removeprefix("trial"))
        assert number in recorded  # never the baseline
        out = json.loads(cli("flops", path, "--json").stdout)
        assert out["flops"] == recorded[number]
    html = (run_dir / "report.html").read_text()
    assert "Pareto" in html and "Tokens per block" in html and "<table" in html and "plotly" in html
    return frame


@pytest.fixture(scope="module")
def psvit_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "psvit"
    result = cli("search", "--space", "psvit", "--flops", "30M", *RERANK, "--out", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_psvit_search_trains_the_baseline_and_reranks_on_two_seeds(psvit_run):
    frame = check_run(psvit_run, 30_000_000, 2)
    baseline = frame[frame["role"] == "baseline"]
    assert len(baseline) == 1 and baseline["state"].iloc[0] == "COMPLETE" and baseline["val_acc"].iloc[0] > 0
    assert baseline["epochs"].iloc[0] == 2  # the same recipe as the candidates
    retrained = pd.read_csv(psvit_run / "retrain.csv")
    assert len(retrained) == 4 and (retrained["state"] == "COMPLETE").all()  # (top 1 + baseline) x 2 seeds
    assert sorted(retrained["seed"].unique()) == [1, 2] and (retrained["epochs"] == 1).all()
    ranking = pd.read_csv(psvit_run / "ranking.csv")
    top = ranking.iloc[0]
    assert top["role"] == "candidate" and top["seeds"] == 2
    number = int(top["number"])
    runs = retrained[retrained["source"] == str(number)]["val_acc"]
    assert top["val_acc_mean"] == pytest.approx(runs.mean()) and top["val_acc_std"] == pytest.approx(runs.std())
    summary = (psvit_run / "summary.md").read_text()
    assert "2 × 1 epoch (seeds 1 2)" in summary and "| baseline |" in summary and "against the baseline" in summary
    assert f"best/01-trial{number}-" in summary


@pytest.mark.slow  # about 35 s: six CLI processes
def test_export_never_deletes_what_a_user_wrote(psvit_run, tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    result = cli("export", psvit_run, "--out", mine)
    assert result.returncode == 2 and "thesis.tex" in result.stderr and result.stderr.count("\n") == 1
    assert (mine / "thesis.tex").read_text() == "years of work" and len(list(mine.iterdir())) == 1
    result = cli("export", psvit_run, "--out", ".", cwd=mine)
    assert result.returncode == 2 and (mine / "thesis.tex").is_file() and len(list(mine.iterdir())) == 1
    exported = tmp_path / "exported"
    assert cli("export", psvit_run, "--top", "2", "--out", exported).returncode == 0
    (exported / "notes.txt").write_text("mine")  # a note beside a previous export survives the next one
    assert cli("export", psvit_run, "--top", "1", "--out", exported).returncode == 0
    assert (exported / "notes.txt").read_text() == "mine" and len(list(exported.glob("*.yaml"))) == 1


def test_export_report_and_train(psvit_run, tmp_path):
    result = cli("export", psvit_run, "--top", "1", "--out", tmp_path / "exported")
    assert result.returncode == 0, result.stderr
    exported = list((tmp_path / "exported").glob("*.yaml"))
    assert [p.name for p in exported] == [p.name for p in sorted((psvit_run / "best").glob("01-*.yaml"))]
    (psvit_run / "summary.md").unlink()
    assert cli("report", psvit_run).returncode == 0 and (psvit_run / "summary.md").is_file()
    out = tmp_path / "trained"
    result = cli("train", exported[0], "--epochs", "1", "--train-subset", "500", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test_acc"] <= 1.0 and metrics["epochs"] == 1  # learning itself: tests/test_train.py
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["config"]["family"] == "schedule_vit"


@pytest.mark.slow  # about 60 s: a second real search
def test_hvt_pareto_nsga2_search(tmp_path):
    run_dir = tmp_path / "hvt"
    result = cli("search", "--space", "hvt", "--flops", "30M", "--objective", "pareto", "--sampler", "nsga2",
                 *QUICK, "--out", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    check_run(run_dir, 30_000_000, 2)
    study = optuna.load_study(storage=f"sqlite:///{run_dir / 'study.db'}", study_name="tokennas")
    assert len(study.directions) == 2


@pytest.mark.parametrize("args,needle", [
    (("--space", "nope", "--flops", "30M"), "nope"),
    (("--space", "psvit", "--flops", "4X"), "4X"),
    (("--space", "psvit", "--flops", "1k"), "smallest"),
    (("--space", "psvit", "--flops", "30M", "--sampler", "cmaes"), "CMA-ES models continuous"),
    (("--space", "psvit", "--flops", "30M", "--sampler", "bayes"), "bayes"),
    (("--space", "psvit", "--flops", "30M", "--train-subset", "0"), "train-subset"),
    (("--space", "psvit", "--flops", "30M", "--train-subset", "500", "--batch-size", "100000"), "100000"),
    (("--space", "psvit", "--flops", "30M", "--lr", "0"), "--lr"),
    (("--space", "psvit", "--flops", "30M", "--lr", "-1"), "--lr"),
    pytest.param(("--space", "psvit", "--flops", "30M", "--gpus-per-trial", "1"), "CUDA",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (("--space", "stt", "--flops", "1.99M", "--trials", "20", "--epochs", "1", "--train-subset", "500"),
     "only 6 distinct"),
    # the one-shot strategy's options (tests/test_oneshot.py has the parent too narrow for the space)
    (("--space", "psvit", "--flops", "30M", "--parent", "x.pt"), "--parent needs --strategy oneshot"),
    (("--space", "crossvit", "--flops", "30M", "--strategy", "oneshot"), "invalid --space 'crossvit'"),
    (("--space", "psvit", "--flops", "30M", "--strategy", "oneshot", "--parent", "missing.pt"),
     "neither a file nor a shipped parent"),
    (("--space", "psvit", "--flops", "30M", "--strategy", "magic"), "invalid --strategy 'magic'"),
    (("--space", "psvit", "--flops", "30M", "--strategy", "oneshot", "--score-images", "0"),
     "invalid --score-images 0"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, needle, capsys):
    """In process, as the CLI's entry point runs it (the subprocess form is the next test)."""
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["search", *args, "--out", str(run_dir)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert not run_dir.exists()


def test_a_batch_larger_than_the_split_exits_2_in_a_real_process(tmp_path):
    run_dir = tmp_path / "run"
    result = cli("search", "--space", "psvit", "--flops", "30M", "--trials", "2", "--epochs", "2", "--train-subset",
                 "500", "--batch-size", "100000", "--out", run_dir)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "100000" in result.stderr and "Traceback" not in result.stderr
    assert not run_dir.exists()


def load(run_dir, name="tokennas"):
    return optuna.load_study(storage=f"sqlite:///{run_dir / 'study.db'}", study_name=name)


@pytest.mark.slow  # about 2.5 minutes: a search killed and resumed
def test_resume_after_sigkill_during_reranking(tmp_path):
    run_dir = tmp_path / "run"
    args = ("search", "--space", "psvit", "--flops", "30M", "--trials", "2", "--epochs", "1", "--train-subset", "500",
            "--seed", "0", "--cpus-per-trial", "2", "--retrain-top", "1", "--retrain-epochs", "2", "--retrain-seeds",
            "2", "--quiet", "--out", run_dir)
    proc = subprocess.Popen([sys.executable, "-m", "tokennas.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    done = []
    deadline = time.monotonic() + 400
    while not done and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            done = [t for t in load(run_dir, S.RUNS_STUDY).trials
                    if t.user_attrs.get("stage") == "retrain" and t.state.name == "COMPLETE"]
        except Exception:  # the run folder or the runs study may not exist yet
            continue
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert done, "no re-ranking run completed before the deadline"
    kept = {(t.user_attrs["source"], t.user_attrs["seed"]): t.user_attrs["val_acc"] for t in done}
    searched = {t.number: t.user_attrs["val_acc"] for t in load(run_dir).trials if S.trained(t)}
    result = cli("search", "--resume", run_dir, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    check_run(run_dir, 30_000_000, 2)
    assert {t.number: t.user_attrs["val_acc"] for t in load(run_dir).trials if S.trained(t)} == searched
    retrained = pd.read_csv(run_dir / "retrain.csv")
    complete = retrained[retrained["state"] == "COMPLETE"]
    assert len(complete) == 4 and not complete.duplicated(["source", "seed"]).any()
    for (source, seed), acc in kept.items():  # what finished before the kill is kept, not run again
        row = complete[(complete["source"] == str(source)) & (complete["seed"] == seed)]
        assert row["val_acc"].iloc[0] == pytest.approx(acc)
    assert (retrained["state"].isin(["COMPLETE", "INTERRUPTED"])).all()


def test_diverging_training_fails_loudly_and_exports_nothing(tmp_path):
    run_dir = tmp_path / "run"
    result = cli("search", "--space", "psvit", "--flops", "30M", "--trials", "2", "--epochs", "2", "--train-subset",
                 "500", "--lr", "1e6", "--quiet", "--out", run_dir)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and "loss is nan" in result.stderr and "Traceback" not in result.stderr
    frame = pd.read_csv(run_dir / "trials.csv")
    trained = frame[frame["state"].isin(["FAIL", "COMPLETE", "PRUNED"])]
    assert len(trained) >= 3 and (trained["state"] == "FAIL").all()
    assert trained["error"].str.contains(r"NonFiniteLoss: loss is nan at epoch 1, step \d+").all()
    assert not list((run_dir / "best").glob("*.yaml"))


@pytest.mark.slow  # about 80 s: a second search on the fixture run
def test_extend_a_finished_search_with_resume(psvit_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(psvit_run, run_dir, ignore=shutil.ignore_patterns("ray"))
    result = cli("search", "--resume", run_dir, "--lr", "0.1")
    assert result.returncode == 2 and "--lr cannot change on --resume" in result.stderr
    result = cli("search", "--resume", run_dir, "--trials", "3", "--retrain-top", "0", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    check_run(run_dir, 30_000_000, 3)
    assert yaml.safe_load((run_dir / "search.yaml").read_text())["trials"] == 3
