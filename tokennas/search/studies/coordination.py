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

Each driver answers these questions from a ``StudyIndex``, kept up to date from the storage on each turn, so that
a proposal costs the same at trial 10 and at trial 10,000.
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
    """(trained candidates, candidates claimed and training) over the whole study, every driver included, by a scan
    (the searcher asks its ``StudyIndex``). Failed candidates do not count towards ``--trials``."""
    trials = study.get_trials(deepcopy=False)
    return (sum(S.trained(t) for t in trials),
            sum(t.state == TrialState.RUNNING and CLAIMED in t.user_attrs for t in trials))


def _key(trial: FrozenTrial) -> str | None:
    return config_key(trial.user_attrs["config"]) if "config" in trial.user_attrs else None


class StudyIndex:
    """What each proposal asks of a study, kept up to date incrementally: how many candidates are trained and
    training, which candidate a config repeats, which lost candidate waits, which configs were proposed, how many
    trials failed, the worst completed accuracy.

    A finished trial never changes (Optuna refuses to update it), so each is folded in once, when ``refresh``
    first sees it finished; the unfinished ones (those training, those being decided, the enqueued ones) are looked
    at again on each ``refresh``, with the trials added since, by any driver of a shared study. A new index (after
    ``--resume``, or in a restored searcher) is built by its first ``refresh``. ``counts`` and
    ``study.find_repeat`` answer the same questions by scanning the study."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self.trials: list[FrozenTrial] = []  # the study at the last refresh; trial numbers are list positions
        self.unfinished: list[int] = []  # ascending
        self.trained = self.failed = 0
        self.worst: float | None = None  # lowest accuracy of a completed candidate (the constant liar's value)
        self.settled: dict[str, int] = {}  # config key -> lowest number of a finished candidate that holds it
        self.tried: set[str] = set()  # config keys of finished feasible proposals (repeats and interrupted ones too)
        self.lost: dict[str, list[int]] = {}  # config key -> trials that lost it with their driver
        # the unfinished trials' part, recomputed by every refresh
        self.training = 0
        self.holding: dict[str, list[int]] = {}
        self.claimed: set[str] = set()
        self.trying: set[str] = set()

    def refresh(self) -> None:
        """Read the trials added or finished since the last refresh (the storage lists them all in one call)."""
        trials = self.study.get_trials(deepcopy=False)
        while trials and trials[-1].number > len(trials) - 1:  # numbered 0, 1, 2...: stop before any gap (a
            trials = trials[:-1]  # trial created by another driver but not visible yet), read it next time
        fresh = [trials[n] for n in self.unfinished] + trials[len(self.trials):]
        self.trials, self.unfinished = trials, []
        self.training, self.holding, self.claimed, self.trying = 0, {}, set(), set()
        for t in fresh:
            key = _key(t)
            if t.state.is_finished():
                self._fold(t, key)
                continue
            self.unfinished.append(t.number)
            if CLAIMED in t.user_attrs:
                self.training += 1
                self.claimed.add(key)
            if key is not None and S.holds_config(t):
                self.holding.setdefault(key, []).append(t.number)
            if key is not None and not S.is_infeasible(t):
                self.trying.add(key)

    def _fold(self, t: FrozenTrial, key: str | None) -> None:
        if S.trained(t):
            self.trained += 1
            if t.state == TrialState.COMPLETE:
                self.worst = t.values[0] if self.worst is None else min(self.worst, t.values[0])
        self.failed += S.is_failed(t)
        if key is None:
            return
        if S.holds_config(t):
            self.settled[key] = min(self.settled.get(key, t.number), t.number)
        if not S.is_infeasible(t):
            self.tried.add(key)
        if is_lost(t):
            self.lost.setdefault(key, []).append(t.number)

    def counts(self) -> tuple[int, int]:
        """(trained candidates, candidates claimed and training), as ``counts``."""
        return self.trained, self.training

    def original(self, key: str, number: int) -> FrozenTrial | None:
        """The earliest other candidate of config ``key`` that holds it (see ``study.find_repeat``), as last read."""
        held = [n for n in (self.settled.get(key), *self.holding.get(key, ())) if n is not None and n != number]
        return self.trials[min(held)] if held else None

    def liar(self) -> float:
        """A pessimistic accuracy for a candidate still training: the worst completed one's, 0.0 before any."""
        return 0.0 if self.worst is None else self.worst

    def proposed(self) -> set[str]:
        """Config keys of every feasible proposal so far (trained, training, failed, interrupted, repeated)."""
        return self.tried | self.trying

    def lost_candidate(self) -> FrozenTrial | None:
        """The oldest candidate whose training was lost with its driver and that nobody trains now or has trained."""
        for key, numbers in sorted(self.lost.items(), key=lambda item: min(item[1])):
            if key not in self.settled and key not in self.claimed and len(numbers) <= MAX_RETRIES:
                return self.trials[min(numbers)]
        return None


def wait_turn(index: StudyIndex, trial: optuna.Trial) -> None:
    """Block until every lower-numbered trial is decided; fail the ones whose driver is gone. ``index`` is fresh on
    return."""
    study = index.study
    while True:
        adapter.fail_stale(study)
        index.refresh()
        now = datetime.datetime.now()
        waiting = False
        for number in index.unfinished:
            other = index.trials[number]
            if number >= trial.number:
                break
            if is_decided(other):
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


def take_turn(index: StudyIndex, trial: optuna.Trial, target: int | None) -> optuna.Trial | None:
    """Wait for this trial's turn. Returns the trial to sample (re-opened on a lost candidate's parameters
    if one is waiting), or None after withdrawing it because the study already has ``target`` candidates."""
    study = index.study
    wait_turn(index, trial)
    if target is not None:
        done, training = index.counts()
        if done + training >= target:
            trial.set_user_attr(WITHDRAWN, True)
            study.tell(trial, state=TrialState.FAIL)
            return None
    if adapter.is_enqueued(study, trial):
        return trial  # enqueued (a resumed or fallback candidate): keep it
    lost = index.lost_candidate()
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
