"""`tokennas dashboard`: Optuna's dashboard over a run folder, checked in a real headless Chromium."""

import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from tokennas.cli import main
from tokennas.search.studies.study import STUDY_NAME, storage_url

EXAMPLE = Path(__file__).parents[1] / "results/example"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as a search leaves it (search.yaml + study.db), its three trials told through Optuna's API."""
    shutil.copy(EXAMPLE / "search.yaml", tmp_path / "search.yaml")
    study = optuna.create_study(storage=storage_url(tmp_path), study_name=STUDY_NAME, direction="maximize")
    for width, acc in ((48, 0.61), (64, 0.72), (96, 0.83)):
        trial = study.ask({"embed_dim": optuna.distributions.CategoricalDistribution([48, 64, 96])})
        trial.set_user_attr("flops", width * 1000)
        trial.report(acc - 0.1, 1)
        study.tell(trial, acc)
    return tmp_path


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it with apt-get as root)")
def test_dashboard_shows_the_trials_in_a_browser(run_dir, tmp_path_factory):
    server = subprocess.Popen([sys.executable, "-m", "tokennas.cli", "dashboard", str(run_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert "http://127.0.0.1:" in line, line + server.stderr.read()
        url = line.split()[line.split().index("at") + 1]
        page = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--virtual-time-budget=15000",
             "--dump-dom", f"{url}studies/1/trials"],
            capture_output=True, text=True, timeout=120).stdout
    finally:
        server.terminate()
        server.wait(timeout=10)
    # rendered by the dashboard's JavaScript from the study: one entry per trial, and a trial's parameter
    for number in range(3):
        assert f"Trial {number}" in page
    assert "Trial 3" not in page and "embed_dim" in page


def test_dashboard_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["dashboard", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a tokennas run folder" in err
