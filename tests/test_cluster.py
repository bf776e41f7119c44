"""Issue 11 on real servers: a two-node Ray cluster, a PostgreSQL study shared by two drivers, lost nodes
and lost drivers, bad addresses. Nothing is mocked; every server is started and stopped here."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState
from servers import PASSWORD, free_port, postgres_installed, postgres_server, ray_cluster

from tokennas.cli import main
from tokennas.search.studies import coordination as C
from tokennas.search.studies import study as S

pytestmark = pytest.mark.cluster
BASE = ("--space", "psvit", "--flops", "30M", "--train-subset", "300", "--seed", "0", "--quiet")
SMALL = (*BASE, "--retrain-top", "0")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tokennas.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def spawn(*args):
    return subprocess.Popen([sys.executable, "-m", "tokennas.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc, timeout=600):
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def load(url, name):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(storage=url, study_name=name)


def check_exactly(study, trials):
    """``trials`` trained candidates, no config trained twice, nothing left RUNNING or WAITING."""
    done = [t for t in study.trials if S.trained(t)]
    configs = [repr(sorted(t.params.items())) for t in done]
    assert len(done) == trials, [(t.number, t.state.name, t.user_attrs) for t in study.trials]
    assert len(set(configs)) == trials, "a candidate was trained twice"
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return done


def grep_password(*folders):
    hits = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and PASSWORD.encode() in path.read_bytes():
                hits.append(str(path))
    return hits


@pytest.fixture(scope="module")
def postgres():
    if not postgres_installed():
        pytest.skip("Debian's postgresql is not installed (`make test` installs it as root)")
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="module")
def nodes():
    with ray_cluster(workers=2) as cluster:
        yield cluster


def test_bad_storage_or_ray_address_exits_2_in_one_line_and_writes_nothing(tmp_path, capsys):
    closed = free_port()  # nothing listens there
    cases = [
        (("--storage", "nosuch://host/db"), "nosuch"),
        (("--storage", "postgresql//user@host/db"), "postgresql//user@host/db"),
        (("--storage", f"postgresql://u:{PASSWORD}@127.0.0.1:{closed}/db"), f"127.0.0.1:{closed}"),
        (("--storage", "journal:/no/such/folder/study.log"), "/no/such/folder"),
        (("--ray-address", "http://127.0.0.1:6379"), "http://127.0.0.1:6379"),
        (("--ray-address", "127.0.0.1:port"), "127.0.0.1:port"),
        (("--ray-address", f"127.0.0.1:{closed}"), f"127.0.0.1:{closed}"),
        (("--ray-address", f"ray://127.0.0.1:{closed}"), f"ray://127.0.0.1:{closed}"),
    ]
    for i, (args, needle) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        start = time.monotonic()
        with pytest.raises(SystemExit) as exit_:
            main(["search", *SMALL, "--trials", "1", *args, "--out", str(run_dir)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (args, err)
        assert time.monotonic() - start < 30
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err, (args, err)
        assert ("--storage" in err) == ("--storage" in args) and PASSWORD not in err
        assert not run_dir.exists()


@pytest.mark.slow  # about 50 s: a search on a two-node cluster
def test_search_spreads_over_two_ray_nodes(tmp_path, nodes):
    run_dir = tmp_path / "run"
    # long enough trials that the next proposal arrives while the first still trains
    result = cli("search", *SMALL, "--train-subset", "1000", "--trials", "3", "--epochs", "2", "--scheduler", "fifo",
                 "--ray-address", nodes.address, "--out", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    frame = pd.read_csv(run_dir / "trials.csv")
    trained = frame[frame["state"] == "COMPLETE"]
    assert (trained["role"] == "candidate").sum() == 3 and (trained["role"] == "baseline").sum() == 1
    workers = {node.node_id[:8] for node in nodes.worker_nodes}
    assert {node.split("/")[1] for node in trained["node"]} == workers  # both workers trained


@pytest.mark.slow  # about 2 minutes: a node removed mid-trial
def test_lost_worker_node_trial_resumes_elsewhere_from_its_checkpoint(tmp_path, nodes):
    run_dir = tmp_path / "run"
    proc = spawn("search", *SMALL, "--train-subset", "1500", "--trials", "1", "--epochs", "4", "--scheduler", "fifo",
                 "--ray-address", nodes.address, "--out", run_dir)
    first = None
    deadline = time.monotonic() + 300
    while first is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.3)
        try:
            trials = load(f"sqlite:///{run_dir / 'study.db'}", "tokennas").trials
        except Exception:  # not created yet
            continue
        running = [t for t in trials if t.state == TrialState.RUNNING and "node" in t.user_attrs]
        first = running[0] if running else None
    assert first is not None, "no trial reported an epoch in time"
    victim = next(n for n in nodes.worker_nodes if n.node_id.startswith(first.user_attrs["node"].split("/")[1]))
    nodes.remove_node(victim, allow_graceful=False)
    finish(proc)
    trial = load(f"sqlite:///{run_dir / 'study.db'}", "tokennas").trials[first.number]
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["epochs"] == 4
    assert trial.user_attrs["node"] != first.user_attrs["node"]  # finished on the other worker
    assert trial.user_attrs["resumed_from_epoch"] >= 1  # from its checkpoint, not from scratch
    assert sorted(trial.intermediate_values) == [1, 2, 3, 4]


@pytest.mark.slow  # about 90 s: two drivers on a PostgreSQL study
def test_two_drivers_share_one_postgres_study(tmp_path, postgres):
    runs = [tmp_path / "a", tmp_path / "b"]
    # with re-ranking: the two drivers also share the baseline and re-ranking runs, each run once
    args = (*BASE, "--trials", "4", "--epochs", "1", "--retrain-top", "1", "--retrain-epochs", "1",
            "--retrain-seeds", "1", "--storage", postgres, "--study-name", "two")
    procs = [spawn("search", *args, "--out", run) for run in runs]
    for proc in procs:
        finish(proc)
    done = check_exactly(load(postgres, "two"), 4)
    assert {t.user_attrs["node"] for t in done}  # trained by Ray on the drivers' nodes
    for run in runs:  # both drivers report the whole study
        frame = pd.read_csv(run / "trials.csv")
        candidates = frame[frame["role"] == "candidate"]
        assert candidates["state"].isin(["COMPLETE", "PRUNED"]).sum() == 4
        assert (frame["role"] == "baseline").sum() == 1  # the reference run, trained once for both
        retrained = pd.read_csv(run / "retrain.csv")
        assert len(retrained) == 2 and set(retrained["state"]) == {"COMPLETE"}  # the top 1 and the baseline, once
    assert grep_password(*runs) == []
    assert f"postgresql://tokennas@{postgres.split('@')[1]}" in (runs[0] / "search.yaml").read_text()


@pytest.mark.slow  # about 80 s: two drivers, one killed
def test_sigkilled_driver_is_covered_by_the_other(tmp_path, postgres):
    url, name = postgres, "killed"
    args = (*SMALL, "--train-subset", "1000", "--trials", "3", "--epochs", "2", "--storage", url, "--study-name", name,
            "--heartbeat", "2")
    first = spawn("search", *args, "--out", tmp_path / "a")
    deadline = time.monotonic() + 300
    claimed = []
    while not claimed and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.3)
        try:
            claimed = [t.number for t in load(url, name).trials
                       if t.state == TrialState.RUNNING and C.CLAIMED in t.user_attrs]
        except KeyError:  # the study is not created yet
            continue
    assert claimed, "the first driver claimed no trial in time"
    second = spawn("search", *args, "--out", tmp_path / "b")
    time.sleep(3)
    assert load(url, name).trials[claimed[0]].state == TrialState.RUNNING
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    finish(second)
    study = load(url, name)
    check_exactly(study, 3)
    lost = study.trials[claimed[0]]
    assert lost.state == TrialState.FAIL and "error" not in lost.user_attrs  # failed by its heartbeat
    retried = [t for t in study.trials if t.user_attrs.get("retry_of") == lost.number]
    assert retried and any(S.trained(t) for t in retried)  # its candidate was trained by the other driver
    assert grep_password(tmp_path) == []


def test_the_supernet_is_given_the_cores_of_a_node_that_has_its_gpus():
    """A single trial asking for more cores than any node with its GPUs has could never be placed."""
    import ray

    from tokennas.search.tune.cluster import node_cpus

    ray.init(num_cpus=3, num_gpus=1, include_dashboard=False, log_to_driver=False)  # GPUs declared, none needed
    try:
        assert (node_cpus(), node_cpus(1), node_cpus(0.5), node_cpus(2)) == (3.0, 3.0, 3.0, None)
    finally:
        ray.shutdown()
