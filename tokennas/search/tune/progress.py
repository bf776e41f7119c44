"""A rich live table of the trials while Ray Tune runs them (Ray's own output goes to search.log)."""

from __future__ import annotations

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
                 enabled: bool = True) -> None:
        self.searcher, self.settings, self.remaining, self.stage = searcher, settings, remaining, stage
        self.rows: dict[str, dict[str, Any]] = {}
        self.started = time.monotonic()
        self.live = Live(self.render(), console=Console(stderr=True), refresh_per_second=2,
                         transient=False) if enabled else None

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
                            f"{getattr(self.searcher, 'repeats', 0)} repeats, {time.monotonic() - self.started:.0f}s")
        for column in ("trial", "role", "state", "FLOPs", "epoch", "val_acc"):
            table.add_column(column, justify="right" if column != "state" else "left")
        for row in self.rows.values():
            acc = f"{row['val_acc']:.4f}" if row.get("val_acc") is not None else "-"
            table.add_row(str(row["number"]), row["role"], row["state"], format_flops(row["flops"]),
                          str(row.get("epoch", 0)), acc)
        return table

    def _update(self, trial: Any, **changes: Any) -> None:
        row = self.rows.setdefault(trial.trial_id, {"number": trial.config.get("number"),
                                                    "role": trial.config.get("role", "candidate"),
                                                    "flops": trial.config.get("flops", 0), "state": "PENDING"})
        row.update(changes)
        if self.live is not None:
            self.live.update(self.render())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, state="RUNNING")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "error" in result:  # the trainable caught the candidate's failure
            self._update(trial, state="ERROR")
        elif "epoch_progress" in result:  # progress inside an epoch (the supernet)
            self._update(trial, epoch=f"{result.get('epoch_progress', 0):.1f}")
        else:
            self._update(trial, epoch=result.get("epoch"), val_acc=result.get("val_acc"))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.rows.get(trial.trial_id, {}).get("state") == "ERROR":
            return
        epoch = self.rows.get(trial.trial_id, {}).get("epoch") or 0
        planned = trial.config.get("epochs", self.settings.epochs)
        self._update(trial, state="COMPLETE" if epoch >= planned else "STOPPED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, state="ERROR")
