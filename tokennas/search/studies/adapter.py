"""Every use of Optuna's private or experimental API in tokennas, in one place.

Our searchers ask and tell trials outside ``study.optimize``, so they need a few things Optuna keeps to itself: a
trial's storage id, its stored attributes while it runs, a handle re-made from a trial number, the fixed parameters
``enqueue_trial`` sets, heartbeats and the stale-trial sweep. ``pyproject.toml`` pins Optuna's major version; an
Optuna release that moves any of these changes this file only.
"""

from __future__ import annotations

import warnings
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial

FIXED_PARAMS = "fixed_params"  # the system attribute enqueue_trial sets, read by Optuna when the trial samples


def storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage object a study was opened on (to open a sibling study in it, or to pickle where it lives)."""
    return study._storage


def backend(study: optuna.Study) -> Any:
    """The storage under Optuna's cache wrapper."""
    return getattr(study._storage, "_backend", study._storage)


def heartbeat_interval(study: optuna.Study) -> float | None:
    """Seconds between heartbeats when the study's storage has them (an RDB storage opened with an interval)."""
    found = backend(study)
    return found.heartbeat_interval if isinstance(found, RDBStorage) else None


def user_attrs(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> dict[str, Any]:
    """A trial's user attributes as stored now (an ``optuna.Trial`` has no public reader while it runs)."""
    return study._storage.get_trial_user_attrs(trial._trial_id)


def set_user_attr(study: optuna.Study, trial: FrozenTrial, key: str, value: Any) -> None:
    """Set a user attribute on a trial known only by its frozen copy (a RUNNING trial of a killed driver)."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


def handle(study: optuna.Study, number: int) -> optuna.Trial:
    """A live ``optuna.Trial`` for the trial numbered ``number`` (after unpickling a searcher)."""
    return optuna.Trial(study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))


def is_enqueued(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Whether the trial samples fixed parameters (``enqueue_trial``, or ``fix_params``)."""
    return FIXED_PARAMS in study._storage.get_trial_system_attrs(trial._trial_id)


def fix_params(study: optuna.Study, trial: optuna.Trial, params: dict[str, Any]) -> optuna.Trial:
    """Make an asked trial sample ``params``, as ``enqueue_trial`` would have; returns the re-read handle."""
    study._storage.set_trial_system_attr(trial._trial_id, FIXED_PARAMS, params)
    return optuna.Trial(study, trial._trial_id)


def record_heartbeat(study: optuna.Study, trial: optuna.Trial) -> None:
    study._storage.record_heartbeat(trial._trial_id)


def fail_stale(study: optuna.Study) -> None:
    """Optuna's (experimental) sweep of RUNNING trials whose heartbeat stopped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
