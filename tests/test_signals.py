"""SIGINT and SIGTERM stop a search gracefully: one line saying how to resume, exit 130 or 143, the running trial
INTERRUPTED with the reason, no Ray or abseil dump and no traceback; `--resume` then completes the run."""

import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest

ARGS = ("search", "--space", "psvit", "--flops", "30M", "--trials", "1", "--epochs", "2", "--train-subset", "1000",
        "--scheduler", "fifo", "--seed", "0", "--retrain-top", "0", "--quiet")


def running_trial(run_dir) -> bool:
    try:
        study = optuna.load_study(storage=f"sqlite:///{run_dir / 'study.db'}", study_name="tokennas")
        return any(t.state.name == "RUNNING" for t in study.trials)
    except Exception:  # the run folder or the study may not exist yet
        return False


def stop_and_resume(tmp_path, signum):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tokennas.cli", *ARGS, "--out", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not running_trial(run_dir) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(3)  # inside the trial's training
    sent = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err[-3000:]
    assert err.count("\n") == 1 and err.startswith(f"stopped by {name}: search: ")
    assert err.rstrip().endswith(f"`tokennas search --resume {run_dir}` completes the run")
    assert "received at time" not in out + err and "Traceback" not in out + err and out == ""
    assert took < 30, took
    frame = pd.read_csv(run_dir / "trials.csv")  # the reports are written
    interrupted = frame[frame["state"] == "INTERRUPTED"]
    assert len(interrupted) >= 1
    assert interrupted["error"].str.startswith(f"interrupted: stopped by {name} after epoch").all()
    resumed = subprocess.run([sys.executable, "-m", "tokennas.cli", "search", "--resume", str(run_dir), "--quiet"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    frame = pd.read_csv(run_dir / "trials.csv")
    assert (frame[frame["role"] == "candidate"]["state"] == "COMPLETE").sum() == 1


def test_sigterm_stops_the_search_gracefully_and_resume_completes_it(tmp_path):
    stop_and_resume(tmp_path, signal.SIGTERM)


@pytest.mark.slow  # the same path as SIGTERM, about a minute
def test_sigint_stops_the_search_gracefully_and_resume_completes_it(tmp_path):
    stop_and_resume(tmp_path, signal.SIGINT)
