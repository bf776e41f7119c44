"""Several drivers on one study, without Ray: the study's count and the repeat check hold across drivers."""

import threading

import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState
from ray.tune.search import Searcher

from tokennas.search.studies import coordination as C
from tokennas.search.studies import storage as ST
from tokennas.search.studies import study as S
from tokennas.search.tune.searcher import BudgetSearcher
from tokennas.spaces import Inputs, get_space

BUDGET = 30_000_000


def driver(path, target, seed):
    """One driver's searcher, with its own storage handle on the shared journal file (as a process would)."""
    study = S.open_study(JournalStorage(JournalFileBackend(str(path))), "acc", S.make_sampler("random", seed, 8),
                         create=True, study_name="shared")
    return BudgetSearcher(study, get_space("psvit"), Inputs(), BUDGET, max_epochs=1, trials=target, stall=20)


def run(searcher, prefix, errors, together=None):
    try:
        i = 0
        while True:
            suggestion = searcher.suggest(f"{prefix}{i}")
            if together is not None:  # in lock step: both drivers propose before either finishes a trial
                try:
                    together.wait(timeout=5)
                except threading.BrokenBarrierError:  # the other driver is done
                    together = None
            if suggestion == Searcher.FINISHED:
                break
            if suggestion is not None:
                searcher.on_trial_complete(f"{prefix}{i}", {"val_acc": 0.5, "epoch": 1})
                i += 1
    except Exception as err:  # surfaced by the test
        errors.append(err)


def test_two_drivers_proposing_the_same_candidates_train_exactly_target(tmp_path):
    """Same sampler seed in both: every candidate is proposed by both drivers at about the same moment."""
    searchers = [driver(tmp_path / "study.log", 6, seed=0) for _ in range(2)]
    errors = []
    together = threading.Barrier(2)
    threads = [threading.Thread(target=run, args=(searcher, prefix, errors, together))
               for searcher, prefix in zip(searchers, "ab", strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads)
    trials = searchers[0].study.trials
    trained = [t for t in trials if S.trained(t)]
    assert len(trained) == 6
    assert len({repr(sorted(t.params.items())) for t in trained}) == 6
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert sum(s.repeats for s in searchers) >= 1  # the race happened and the repeat check caught it


def test_a_lost_candidate_is_trained_again_on_a_fresh_trial(tmp_path):
    first = driver(tmp_path / "study.log", 3, seed=0)
    lost = first.suggest("a")
    # the driver dies: its claimed trial is failed (as the heartbeat would) without a reason
    first.study.tell(lost["number"], state=TrialState.FAIL)
    second = driver(tmp_path / "study.log", 3, seed=1)
    again = second.suggest("b")
    assert again["config"] == lost["config"] and again["number"] > lost["number"]
    assert second.study.trials[again["number"]].user_attrs["retry_of"] == lost["number"]


def test_a_full_study_withdraws_a_late_trial(tmp_path):
    searcher = driver(tmp_path / "study.log", 1, seed=0)
    searcher.suggest("a")
    late = searcher.study.ask()  # another driver asked just before the last slot was taken
    assert C.take_turn(searcher.index, late, 1) is None
    assert searcher.study.trials[late.number].user_attrs[C.WITHDRAWN]
    assert searcher.suggest("b") is None  # wait: the one candidate is still training
    searcher.on_trial_complete("a", {"val_acc": 0.5, "epoch": 1})
    searcher._next_poll = 0.0
    assert searcher.suggest("c") == Searcher.FINISHED


@pytest.mark.parametrize("url,expected", [
    ("postgresql://user:pw@db:5432/study", "postgresql://user@db:5432/study"),
    ("postgresql://user@db/study", "postgresql://user@db/study"),
    ("mysql+pymysql://u:p%40ss@db/study?charset=utf8", "mysql+pymysql://u@db/study?charset=utf8"),
    ("journal:/tmp/x.log", "journal:/tmp/x.log"),
    (None, None),
])
def test_redact_keeps_everything_but_the_password(url, expected):
    assert ST.redact(url) == expected


def test_resume_takes_the_storage_again_with_its_password_and_nothing_else(tmp_path):
    from tokennas.search.run import resume_settings
    from tokennas.search.settings import SearchSettings, save_settings

    save_settings(SearchSettings(space="psvit", flops="30M", storage="postgresql://u@db:5432/s"),
                  tmp_path / "search.yaml")  # as run_search stores it: without the password
    settings = resume_settings(tmp_path, {"storage": "postgresql://u:pw@db:5432/s", "trials": 5})
    assert settings.storage == "postgresql://u:pw@db:5432/s" and settings.trials == 5
    with pytest.raises(ValueError, match="--storage cannot change on --resume"):
        resume_settings(tmp_path, {"storage": "postgresql://u:pw@elsewhere:5432/s"})
    assert resume_settings(tmp_path, {"ray_address": "auto"}).ray_address == "auto"
    with pytest.raises(ValueError, match="--study-name cannot change on --resume"):
        resume_settings(tmp_path, {"study_name": "other"})


def test_a_run_study_is_kept_in_wal_mode_and_survives_pickling_and_a_kill(tmp_path):
    """study.db commits without an fsync each (WAL, synchronous=NORMAL); Ray's pickled copy keeps the pragmas; what
    a killed process committed is there for the next one."""
    import pickle
    import sqlite3
    import subprocess
    import sys

    study = S.open_study(tmp_path, "acc", create=True)
    backend = S.adapter.backend(study)
    assert isinstance(backend, S.RunStorage)
    copy = pickle.loads(pickle.dumps(backend))
    with copy.engine.connect() as connection:
        pragma = connection.exec_driver_sql
        assert pragma("PRAGMA journal_mode").scalar() == "wal" and pragma("PRAGMA synchronous").scalar() == 1
    code = ("import os, sys; from pathlib import Path; from tokennas.search.studies import study as S; "
            "s = S.open_study(Path(sys.argv[1]), 'acc'); s.tell(s.ask(), 0.25); os._exit(9)")  # no clean close
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)]).returncode == 9
    assert [t.value for t in S.open_study(tmp_path, "acc").trials] == [0.25]
    S.close(study)
    copy.engine.dispose()
    assert [row[0] for row in sqlite3.connect(tmp_path / "study.db").execute("PRAGMA journal_mode")] == ["wal"]
