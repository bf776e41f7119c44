"""Several drivers, one study: the study keeps the count of trained candidates and their identity.

Every driver asks Optuna for trials concurrently, so "how many are trained" and "is this candidate
already taken" are race-prone when asked of a shared study. They are answered here with a ticket lock
that needs nothing but the storage: Optuna numbers trials atomically and in commit order (the RDB
storage locks the study row to number a trial; SQLite and the journal file serialise writes). A trial
is *undecided* from ``ask`` until it is either told (over budget, a repeat, withdrawn) or *claimed* for
training (a user attribute). A trial takes its turn once every lower-numbered trial is decided; only
then does it sample, check the budget, look for repeats and count. Lower-numbered trials never wait
for higher ones, so there is no deadlock, and a decision made on one's turn sees every decision before it.

A driver that dies leaves RUNNING trials. Claimed ones carry Optuna heartbeats (RDB storages) and are
failed by ``fail_stale_trials`` once stale; their candidate is then proposed again, on a fresh trial, by
whichever driver takes the next turn. An undecided trial older than ``ABANDONED_S`` (its driver died while
proposing; a decision takes well under a second) is failed by the next driver that waits on it.
"""

from __future__ import annotations

import datetime
import time

import optuna
from optuna.trial import FrozenTrial, TrialState

from ...config import config_key
from . import adapter
from . import study as S

CLAIMED = "claimed"  # user attribute: this trial trains (set on its turn, after the budget and repeat checks)
WITHDRAWN = "withdrawn"  # user attribute: the study already had its candidates when this trial's turn came
ABANDONED_S = 60.0
MAX_RETRIES = 3  # a candidate whose trial was lost this many times is not proposed again
POLL_S = 0.05


def is_decided(trial: FrozenTrial) -> bool:
    return trial.state != TrialState.RUNNING or CLAIMED in trial.user_attrs


def settled(trial: FrozenTrial) -> bool:
    """A candidate this search is done with: trained, or failed while training (with its error). A trial
    failed because its driver died has no reason; its candidate is proposed again."""
    return S.trained(trial) or S.is_failed(trial)


def is_lost(trial: FrozenTrial) -> bool:
    """Claimed for training, then failed with no reason of ours: its driver stopped sending heartbeats."""
    return (trial.state == TrialState.FAIL and CLAIMED in trial.user_attrs and not settled(trial)
            and not any(k in trial.user_attrs for k in ("interrupted", "repeat_of", WITHDRAWN)))


def counts(study: optuna.Study) -> tuple[int, int]:
    """(trained candidates, candidates claimed and training) over the whole study, every driver included.
    Failed candidates do not count towards ``--trials``."""
    trials = study.get_trials(deepcopy=False)
    return (sum(S.trained(t) for t in trials),
            sum(t.state == TrialState.RUNNING and CLAIMED in t.user_attrs for t in trials))


def wait_turn(study: optuna.Study, trial: optuna.Trial) -> None:
    """Block until every lower-numbered trial is decided; fail the ones whose driver is gone."""
    while True:
        adapter.fail_stale(study)
        now = datetime.datetime.now()
        waiting = False
        for other in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if other.number >= trial.number or is_decided(other):
                continue
            if other.datetime_start and (now - other.datetime_start).total_seconds() > ABANDONED_S:
                try:  # its driver died between ask and decision: nobody will ever decide it
                    study.tell(other.number, state=TrialState.FAIL)
                except (ValueError, RuntimeError):
                    pass  # another driver failed it first
                continue
            waiting = True
        if not waiting:
            return
        time.sleep(POLL_S)


def lost_candidate(study: optuna.Study) -> FrozenTrial | None:
    """The oldest candidate whose training was lost with its driver and that nobody trains now or has trained."""
    trials = study.get_trials(deepcopy=False)

    def key(t: FrozenTrial) -> str | None:
        return config_key(t.user_attrs["config"]) if "config" in t.user_attrs else None

    held = {key(t) for t in trials if settled(t) or (t.state == TrialState.RUNNING and CLAIMED in t.user_attrs)}
    lost = [t for t in trials if is_lost(t)]
    for t in lost:
        if key(t) not in held and sum(key(u) == key(t) for u in lost) <= MAX_RETRIES:
            return t
    return None


def take_turn(study: optuna.Study, trial: optuna.Trial, target: int | None) -> optuna.Trial | None:
    """Wait for this trial's turn. Returns the trial to sample (re-opened on a lost candidate's parameters
    if one is waiting), or None after withdrawing it because the study already has ``target`` candidates."""
    wait_turn(study, trial)
    if target is not None:
        done, training = counts(study)
        if done + training >= target:
            trial.set_user_attr(WITHDRAWN, True)
            study.tell(trial, state=TrialState.FAIL)
            return None
    if adapter.is_enqueued(study, trial):
        return trial  # enqueued (a resumed or fallback candidate): keep it
    lost = lost_candidate(study)
    if lost is None:
        return trial
    trial.set_user_attr("retry_of", lost.number)
    return adapter.fix_params(study, trial, lost.params)


def claim(study: optuna.Study, trial: optuna.Trial) -> None:
    """Mark the trial as training (ends its turn) and give it a first heartbeat where the storage has them."""
    trial.set_user_attr(CLAIMED, True)
    if adapter.heartbeat_interval(study) is not None:
        adapter.record_heartbeat(study, trial)


def job_taken(runs: optuna.Study, run: optuna.Trial) -> int | None:
    """The number of a lower-numbered run of the same job (stage, source, seed) that finished, failed
    with an error or is running, in which case ``run`` is withdrawn; else None. Runs whose attributes are
    still being written are waited for, briefly."""
    job = S.job_key(adapter.user_attrs(runs, run))
    deadline = time.monotonic() + ABANDONED_S
    while True:
        others = [t for t in runs.get_trials(deepcopy=False) if t.number < run.number]
        if any(t.state == TrialState.RUNNING and "seed" not in t.user_attrs for t in others) \
                and time.monotonic() < deadline:
            time.sleep(POLL_S)
            continue
        break
    for t in others:
        if S.job_key(t.user_attrs) != job or t.user_attrs.get(WITHDRAWN):
            continue
        if t.state in (TrialState.RUNNING, TrialState.COMPLETE) or "error" in t.user_attrs:
            run.set_user_attr(WITHDRAWN, True)
            runs.tell(run, state=TrialState.FAIL)
            return t.number
    return None
