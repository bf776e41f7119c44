"""End-to-end searches through the real CLI: Optuna, Ray Tune on the CPU, Fashion-MNIST, reports."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
import torch

OUTPUTS = ("trials.csv", "pareto.png", "report.html", "summary.md", "study.db", "search.yaml")
QUICK = ("--trials", "2", "--epochs", "1", "--train-subset", "500", "--seed", "0", "--quiet")


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "tokennas.cli", *map(str, args)], capture_output=True, text=True,
                          **kwargs)


def check_run(run_dir, budget, trials):
    for name in OUTPUTS:
        assert (run_dir / name).is_file(), name
    frame = pd.read_csv(run_dir / "trials.csv")
    complete = frame[frame["state"] == "COMPLETE"]
    assert len(complete) == trials and complete["number"].is_unique
    assert (complete["flops"] <= budget).all()
    best = sorted((run_dir / "best").glob("*.yaml"))
    assert best and best[0].name.startswith("01-")
    recorded = dict(zip(complete["number"], complete["flops"], strict=True))
    for path in best:
        number = int(path.name.split("-")[1].removeprefix("trial"))
        out = json.loads(cli("flops", path, "--json").stdout)
        assert out["flops"] == recorded[number]
    html = (run_dir / "report.html").read_text()
    assert "Pareto" in html and "Tokens per block" in html and "<table" in html and "plotly" in html
    return frame


@pytest.fixture(scope="module")
def psvit_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "psvit"
    result = cli("search", "--space", "psvit", "--flops", "30M", *QUICK, "--out", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_psvit_search(psvit_run):
    check_run(psvit_run, 30_000_000, 2)


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
    assert 0.0 <= metrics["test_acc"] <= 1.0 and metrics["epochs"] == 1
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["config"]["family"] == "schedule_vit"


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
    (("--space", "psvit", "--flops", "30M", "--sampler", "cmaes"), "cmaes"),
    (("--space", "psvit", "--flops", "30M", "--train-subset", "0"), "train-subset"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, needle):
    run_dir = tmp_path / "run"
    result = cli("search", *args, "--out", run_dir)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and needle in result.stderr and "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_resume_after_sigkill(tmp_path):
    run_dir = tmp_path / "run"
    args = ("search", "--space", "psvit", "--flops", "30M", "--trials", "3", "--epochs", "1", "--train-subset", "500",
            "--seed", "0", "--cpus-per-trial", "2", "--quiet", "--out", run_dir)
    proc = subprocess.Popen([sys.executable, "-m", "tokennas.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    completed = []
    deadline = time.monotonic() + 300
    while not completed and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if (run_dir / "study.db").exists():
            try:
                study = optuna.load_study(storage=f"sqlite:///{run_dir / 'study.db'}", study_name="tokennas")
            except Exception:  # the study may not be created yet
                continue
            completed = [t for t in study.trials if t.state.name == "COMPLETE" and "val_acc" in t.user_attrs]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert completed, "no trial completed before the deadline"
    before = {t.number: t.user_attrs["val_acc"] for t in completed}
    result = cli("search", "--resume", run_dir, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    frame = check_run(run_dir, 30_000_000, 3)
    after = frame[frame["state"] == "COMPLETE"].set_index("number")["val_acc"].to_dict()
    assert all(after[n] == pytest.approx(acc) for n, acc in before.items())  # kept, not re-run
