"""A rich live table of the trials while Ray Tune runs them (Ray's own output goes to search.log)."""

from __future__ import annotations

import statistics
import time
from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ...flops import format_flops


class LiveTable(Callback):
    """Each trial's state, FLOPs, epoch and validation accuracy, refreshed as results arrive."""

    def __init__(self, searcher: Any, settings: Any, remaining: int, stage: str = "search",
                 enabled: bool = True, epoch_work: float | None = None) -> None:
        self.searcher, self.settings, self.remaining, self.stage = searcher, settings, remaining, stage
        # before the first epoch is timed: seconds per MAC of a model, per epoch (``epoch_work``); None: no estimate
        self.epoch_work = epoch_work
        self.rows: dict[str, dict[str, Any]] = {}
        self.epoch_seconds: list[float] = []  # every epoch timed so far in this stage, for the ETA
        self.started = time.monotonic()
        # rendered afresh at each refresh: the clock and the estimate move before any trial reports
        self.live = Live(console=Console(stderr=True), refresh_per_second=2, transient=False,
                         get_renderable=self.render) if enabled else None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "live": None, "searcher": None}  # Ray pickles callbacks; a display is not state

    def __enter__(self) -> LiveTable:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self.render())
            self.live.__exit__(*exc)

    def render(self) -> Table:
        done = sum(r["state"] in ("COMPLETE", "STOPPED") for r in self.rows.values())
        failed = sum(r["state"] == "ERROR" for r in self.rows.values())
        table = Table(title=f"tokennas {self.stage}: {self.settings.space} under {self.settings.flops} MACs  "
                            f"{done}/{self.remaining} trained, {failed} failed, "
                            f"{getattr(self.searcher, 'infeasible', 0)} proposals over budget, "
                            f"{getattr(self.searcher, 'repeats', 0)} repeats, {time.monotonic() - self.started:.0f}s"
                            f"{self.eta_text()}")
        for column in ("trial", "role", "state", "FLOPs", "epoch", "val_acc"):
            table.add_column(column, justify="right" if column != "state" else "left")
        for row in list(self.rows.values()):  # a snapshot: Ray's callbacks add rows while the display refreshes
            acc = f"{row['val_acc']:.4f}" if row.get("val_acc") is not None else "-"
            table.add_row(str(row["number"]), row["role"], row["state"], format_flops(row["flops"]),
                          str(row.get("epoch", 0)), acc)
        return table

    def eta_text(self) -> str:
        # a trial not started yet runs the stage's epochs (the searcher's: --retrain-epochs when re-ranking)
        epochs = getattr(self.searcher, "max_epochs", None) or self.settings.epochs
        rows = list(self.rows.values())  # a snapshot: the display thread calls this while callbacks add rows
        seconds = eta_seconds(rows, self.remaining, epochs, list(self.epoch_seconds))
        if seconds is None and self.epoch_work and rows:
            seconds = eta_from_macs(rows, self.remaining, epochs, self.epoch_work)
            return f", ETA ~{format_duration(seconds)} (from MACs, until an epoch is timed)"
        budget = getattr(self.searcher, "budget", None)
        if seconds is None and self.epoch_work and budget:  # no trial yet: every one costs at most the budget
            seconds = self.remaining * epochs * budget * self.epoch_work
            return f", ETA at most ~{format_duration(seconds)} (from the budget, until a trial starts)"
        return "" if seconds is None else f", ETA {format_duration(seconds)}"

    def _update(self, trial: Any, **changes: Any) -> None:
        row = self.rows.setdefault(trial.trial_id, {"number": trial.config.get("number"),
                                                    "role": trial.config.get("role", "candidate"),
                                                    "flops": trial.config.get("flops", 0), "state": "PENDING",
                                                    "planned": trial.config.get("epochs", self.settings.epochs),
                                                    "clock": time.monotonic()})
        row.update(changes)
        if self.live is not None:
            self.live.update(self.render())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, state="RUNNING", clock=time.monotonic())

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "error" in result:  # the trainable caught the candidate's failure
            self._update(trial, state="ERROR")
        elif "epoch_progress" in result:  # progress inside an epoch (the supernet)
            self._update(trial, epoch=f"{result.get('epoch_progress', 0):.1f}")
        else:
            now, row = time.monotonic(), self.rows.get(trial.trial_id)
            if row is not None and result.get("epoch"):  # one epoch since the trial's last report (or its start)
                self.epoch_seconds.append(now - row["clock"])
            self._update(trial, epoch=result.get("epoch"), val_acc=result.get("val_acc"), clock=now)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.rows.get(trial.trial_id, {}).get("state") == "ERROR":
            return
        epoch = self.rows.get(trial.trial_id, {}).get("epoch") or 0
        planned = trial.config.get("epochs", self.settings.epochs)
        self._update(trial, state="COMPLETE" if epoch >= planned else "STOPPED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, state="ERROR")


def eta_seconds(rows: Any, remaining: int, epochs: int, epoch_seconds: list[float]) -> float | None:
    """Seconds the stage still needs, from the epochs timed so far (None before the first): the epochs left to the
    running and pending trials and to the trials not started yet (``epochs`` each; ASHA may stop some sooner, so it
    is an upper estimate), at the median epoch time, spread over the trials running side by side."""
    if not epoch_seconds:
        return None
    rows = list(rows)
    open_rows = [r for r in rows if r["state"] in ("PENDING", "RUNNING")]
    left = sum(max(0.0, r.get("planned", epochs) - float(r.get("epoch") or 0)) for r in open_rows)
    left += max(0, remaining - len(rows)) * epochs
    side_by_side = max(1, sum(r["state"] == "RUNNING" for r in rows))
    return left * statistics.median(epoch_seconds) / side_by_side


def eta_from_macs(rows: Any, remaining: int, epochs: int, epoch_work: float) -> float:
    """Seconds the stage still needs before any epoch is timed: the epochs left to every trial (as ``eta_seconds``),
    each costing its MACs times ``epoch_work`` (seconds per MAC of an epoch on this machine, from
    ``speed.training_macs_per_second``); trials not started yet cost the mean MACs of those that have. The trials
    side by side share the machine the rate was measured on, so they are not divided."""
    rows = list(rows)
    open_rows = [r for r in rows if r["state"] in ("PENDING", "RUNNING")]
    macs = sum(max(0.0, r.get("planned", epochs) - float(r.get("epoch") or 0)) * r["flops"] for r in open_rows)
    macs += max(0, remaining - len(rows)) * epochs * statistics.fmean(r["flops"] for r in rows)
    return macs * epoch_work


def format_duration(seconds: float) -> str:
    """'45s', '12m', '3.4h'."""
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
