"""Where the Optuna study lives: SQLite in the run folder, a shared RDB server, or a journal file.

``--storage`` takes ``postgresql://``, ``mysql://`` (Optuna's ``RDBStorage``, with heartbeats so that
the RUNNING trials of a driver that died are failed and asked again), ``sqlite:///PATH`` or
``journal:PATH`` (Optuna's journal file storage, for a shared filesystem; no heartbeats, so a dead
driver's trials are run again only by ``--resume`` once no driver runs). Without it
the study is ``study.db`` in the run folder, as before.

A password is never written anywhere: ``search.yaml`` and every pickle Ray makes of the searcher hold
the URL without it. At run time it comes from the URL as typed, else from ``TOKENNAS_STORAGE_PASSWORD``
(or, for PostgreSQL, libpq's own ``PGPASSWORD`` and ``~/.pgpass``).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage

from . import adapter
from . import study as S

PASSWORD_ENV = "TOKENNAS_STORAGE_PASSWORD"
RDB_SCHEMES = ("postgresql", "mysql", "sqlite")
SCHEMES = ("postgresql://", "mysql://", "sqlite:///", "journal:PATH")
CONNECT_TIMEOUT_S = 10


def _url(text: str):
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(text)
    except (sqlalchemy.exc.ArgumentError, ValueError) as err:
        raise ValueError(f"invalid --storage {redact(text)!r}: {err}") from None
    return url


def check_url(text: str | None) -> None:
    """Format check only, no I/O; a ``ValueError`` names the bad value."""
    if text is None:
        return
    if text.startswith("journal:"):
        if not text.removeprefix("journal:").strip():
            raise ValueError(f"invalid --storage {text!r}; expected journal:PATH")
        return
    if "://" not in text:
        raise ValueError(f"invalid --storage {redact(text)!r}; expected one of: {', '.join(SCHEMES)}")
    url = _url(text)
    if url.get_backend_name() not in RDB_SCHEMES:
        raise ValueError(f"invalid --storage {redact(text)!r}: unsupported scheme {url.drivername!r}; "
                         f"expected one of: {', '.join(SCHEMES)}")
    if url.get_backend_name() != "sqlite" and not url.host:
        raise ValueError(f"invalid --storage {redact(text)!r}: no host; expected e.g. "
                         "postgresql://USER@HOST:5432/DB")
    if url.get_backend_name() != "sqlite" and not url.database:
        raise ValueError(f"invalid --storage {redact(text)!r}: no database name; expected e.g. "
                         "postgresql://USER@HOST:5432/DB")


# Query-string keys that carry a secret in libpq, psycopg, MySQL drivers and SQLAlchemy URLs.
SECRET_KEYS = ("password", "passwd", "pwd", "sslpassword", "passfile", "sslkey", "secret", "token")


def _is_secret(key: str) -> bool:
    return any(word in key.lower() for word in SECRET_KEYS)


def redact(text: str | None) -> str | None:
    """The URL without its password, in the user part or the query string (kept out of search.yaml, logs,
    reports and pickles)."""
    if text is None or "://" not in text or text.startswith("journal:"):
        return text
    try:
        import sqlalchemy

        url = sqlalchemy.engine.make_url(text)
    except Exception:  # malformed: keep the scheme and the host only
        scheme, _, rest = text.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2].partition('?')[0]}"
    query = {k: v for k, v in url.query.items() if not _is_secret(k)}
    if url.password is None and query == dict(url.query):
        return text
    return url.create(url.drivername, username=url.username, host=url.host, port=url.port, database=url.database,
                      query=query).render_as_string(hide_password=False)


def secrets(text: str) -> list[str]:
    """Every secret in a storage URL (its password, secret query values, TOKENNAS_STORAGE_PASSWORD), to scrub
    from error messages."""
    found = [os.environ.get(PASSWORD_ENV, "")]
    try:
        import sqlalchemy

        url = sqlalchemy.engine.make_url(text)
        found.append(url.password or "")
        for key, value in url.query.items():
            if _is_secret(key):
                found += [value] if isinstance(value, str) else list(value)
    except Exception:  # malformed: nothing parsed, nothing to scrub beyond the environment's
        pass
    return [s for s in found if s]


def with_password(text: str) -> str:
    """The URL to connect with: its own password, else ``TOKENNAS_STORAGE_PASSWORD`` if set."""
    import sqlalchemy

    url = sqlalchemy.engine.make_url(text)
    if url.password is None and url.username and os.environ.get(PASSWORD_ENV):
        url = url.set(password=os.environ[PASSWORD_ENV])
    return url.render_as_string(hide_password=False)


def is_shared(storage: Any) -> bool:
    """True for a study that several drivers may share (anything but the run folder's study.db)."""
    return not isinstance(storage, str)


def beats(study: optuna.Study) -> bool:
    """Whether the study's storage has heartbeats (an RDB storage opened by ``open_storage``)."""
    return adapter.heartbeat_interval(study) is not None


class _RedactedRDBStorage(RDBStorage):
    """Optuna's RDB storage, pickled without the password (Ray pickles the searcher into its run folder)."""

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["url"] = redact(state["url"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["url"] = with_password(state["url"])
        super().__setstate__(state)


def open_storage(text: str | None, run_dir: Path, heartbeat: int = 30) -> Any:
    """The study's storage: a SQLite URL in ``run_dir`` by default (created with the folder), else a
    connected storage object. Unreachable servers and bad paths raise a one-line ``ValueError``."""
    check_url(text)
    if text is None:
        return S.storage_url(run_dir)
    if redact(text) in _OPENED:  # the reports of this process reopen the study from the redacted search.yaml
        return _OPENED[redact(text)]
    _OPENED[redact(text)] = _open(text, heartbeat)
    return _OPENED[redact(text)]


_OPENED: dict[str, Any] = {}  # storages opened by this process, by their URL without password (memory only)


def _open(text: str, heartbeat: int) -> Any:
    if text.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(text.removeprefix("journal:")).expanduser()
        if not path.parent.is_dir():
            raise ValueError(f"invalid --storage {text!r}: folder {str(path.parent)!r} does not exist")
        return JournalStorage(JournalFileBackend(str(path)))
    url = _url(text)
    engine_kwargs: dict[str, Any] = {}
    if url.get_backend_name() in ("postgresql", "mysql"):
        engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}
    try:
        import warnings

        # our searcher asks and tells; storage.Heartbeat beats for its trials as optimize() would
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        for attempt in range(3):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return _RedactedRDBStorage(
                        with_password(text), engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                        grace_period=2 * heartbeat)  # no retry callback: coordination.py re-asks lost candidates
            except Exception as err:
                # drivers started together on an empty database race to create Optuna's tables: the loser
                # sees "already exists" and finds them there on the next try
                if "already exists" not in str(err) or attempt == 2:
                    raise
                time.sleep(1.0 + attempt)
    except ImportError:
        raise ValueError(f"--storage {redact(text)!r} needs a database driver: pip install 'tokennas[cluster]'") \
            from None
    except Exception as err:  # sqlalchemy's OperationalError and friends: say which storage and why, in one line
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        for secret in secrets(text):
            reason = reason.replace(secret, "***")
        raise ValueError(f"cannot open --storage {redact(text)!r}: {reason}") from None


# Settings that say how this driver runs, not what its scores mean: drivers of one study may differ in these.
DRIVER_ONLY = ("time_budget", "max_failures", "top", "ray_address", "ray_storage", "storage", "study_name",
               "heartbeat", "cpus_per_trial", "gpus_per_trial", "retrain_top", "retrain_epochs", "retrain_seeds")


def check_compatible(study: optuna.Study, settings: dict[str, Any], resume: bool = False,
                     defaults: dict[str, Any] | None = None) -> None:
    """Drivers sharing a study must run the same search: every setting that changes what a score means (the
    space and budget, the data and its validation split via ``seed``, the training recipe, the strategy and its
    options, the sampler) must match; the first driver records them. A resumed driver may change ``--trials``
    (extending the search). A setting the first driver did not record (an option added since) counts as its
    ``defaults`` value."""
    mine = {k: v for k, v in settings.items() if k not in DRIVER_ONLY}
    theirs = study.user_attrs.get("search")
    if theirs is None or (resume and theirs.get("trials") != mine["trials"]):
        study.set_user_attr("search", mine)
        theirs = theirs or mine
    for key in mine:
        if key == "trials" and resume:
            continue
        recorded = theirs.get(key, (defaults or {}).get(key))
        if recorded != mine[key]:
            option = "--" + key.replace("_", "-")
            raise ValueError(f"study {study.study_name!r} holds a search with {option} {recorded}, "
                             f"not {mine[key]}; use the same options or another --study-name")


def check_encoding(study: optuna.Study, distributions: dict[str, Any], space: str) -> None:
    """A study written by another encoding of the space (a parameter it no longer asks, or asks with another kind of
    distribution) cannot be continued: Optuna refuses a new kind for a stored name, and a retried candidate would not
    be the one that was interrupted. Raises one line naming the parameter."""
    for trial in study.get_trials(deepcopy=False):
        for name, stored in trial.distributions.items():
            now = distributions.get(name)
            if now is None or type(now) is not type(stored) or (now != stored and not hasattr(now, "low")):
                raise ValueError(f"study {study.study_name!r} holds {space} proposals in another encoding (parameter "
                                 f"{name!r}: {stored}, now {now}); this version cannot continue it: start a new run "
                                 "(--out) or use another --study-name")


def recover_lost_trials(study: optuna.Study, resume: bool, enqueue: bool = True) -> None:
    """Trials left RUNNING by a driver that died, and trials cut off by ``--time-budget``.

    With heartbeats only the stale RUNNING trials are failed (other drivers may be alive) and
    ``coordination`` proposes their candidates again; without heartbeats a resumed run (or the only
    driver of a run-folder study) fails every RUNNING trial, which assumes no other driver is running.
    On resume the interrupted candidates are asked again (``enqueue``)."""
    heartbeat = beats(study)
    if heartbeat:
        adapter.fail_stale(study)
    if resume or not is_shared(adapter.storage(study)):
        S.resume_interrupted(study, fail_running=not heartbeat, enqueue=enqueue)


class Heartbeat:
    """Records a heartbeat for this driver's live trials, as ``study.optimize`` would for its own.

    Optuna only beats for trials run by ``optimize``; ours are asked and told by the searcher, so
    this thread does it for every trial the searcher holds.
    """

    def __init__(self, study: optuna.Study, live_trials) -> None:
        self.study, self.live_trials = study, live_trials
        self.interval = adapter.heartbeat_interval(study)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="tokennas-heartbeat")

    def _beat(self) -> None:
        while not self._stop.wait(self.interval / 2):
            for trial in list(self.live_trials()):
                try:
                    adapter.record_heartbeat(self.study, trial)
                except Exception:  # a trial told meanwhile, or a lost connection: the next beat retries
                    pass

    def __enter__(self) -> Heartbeat:
        if self.interval is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def open_run_study(run_dir: Path, settings: Any) -> optuna.Study:
    """The study of a run folder, wherever it lives (for ``report`` and ``export``)."""
    return S.open_study(open_storage(settings.storage, run_dir, settings.heartbeat) if settings.storage else run_dir,
                        settings.objective, study_name=settings.study_name)
