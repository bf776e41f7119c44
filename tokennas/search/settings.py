"""Search settings: every option of `tokennas search`, validated, and stored as ``search.yaml``.

The driver and the reports both depend on this module, and not on each other.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from ..data import EMBEDDED
from ..flops import parse_flops
from ..spaces import get_space
from . import study as S

SCHEDULERS = ("asha", "fifo")


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """Everything a search needs; stored as ``search.yaml`` in the run folder."""

    space: str
    flops: str  # the budget as typed, e.g. "30M"
    trials: int = 12
    epochs: int = 3
    objective: str = "acc"
    sampler: str = "tpe"
    scheduler: str = "asha"
    seed: int = 0
    dataset: str = EMBEDDED
    data_dir: str | None = None
    img_size: int = 32
    train_subset: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    gpus_per_trial: float | None = None  # None: 1 when CUDA is present, else 0
    cpus_per_trial: float = 1.0
    time_budget: str | None = None  # e.g. "30m"; the search stops gracefully
    top: int = 5
    # issue 11: where it runs and where the study lives
    ray_address: str | None = None  # None/local: a private Ray; auto; HOST:PORT; ray://HOST:PORT
    ray_storage: str | None = None  # Ray Tune's storage_path (shared filesystem or cloud URI); None: RUN_DIR/ray
    storage: str | None = None  # Optuna storage URL, password never stored; None: RUN_DIR/study.db
    study_name: str = S.STUDY_NAME
    heartbeat: int = 30  # seconds between heartbeats of a shared RDB study; a trial is lost after twice that

    @property
    def budget(self) -> int:
        return parse_flops(self.flops)

    def validate(self) -> None:
        """One ``ValueError`` naming the first bad option."""
        get_space(self.space)
        self.budget  # noqa: B018  (raises on a bad budget)
        checks = [
            (self.trials >= 1, f"invalid --trials {self.trials}; expected at least 1"),
            (self.epochs >= 1, f"invalid --epochs {self.epochs}; expected at least 1"),
            (self.objective in S.OBJECTIVES, f"invalid --objective {self.objective!r}; expected one of: "
                                             f"{', '.join(S.OBJECTIVES)}"),
            (self.sampler in S.SAMPLERS, f"invalid --sampler {self.sampler!r}; expected one of: "
                                         f"{', '.join(S.SAMPLERS)}"),
            (self.scheduler in SCHEDULERS, f"invalid --scheduler {self.scheduler!r}; expected one of: "
                                           f"{', '.join(SCHEDULERS)}"),
            (self.batch_size >= 1, f"invalid --batch-size {self.batch_size}; expected at least 1"),
            (self.cpus_per_trial > 0, f"invalid --cpus-per-trial {self.cpus_per_trial}; expected > 0"),
            (self.gpus_per_trial is None or self.gpus_per_trial >= 0,
             f"invalid --gpus-per-trial {self.gpus_per_trial}; expected >= 0"),
            (self.top >= 1, f"invalid --top {self.top}; expected at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        self.validate_cluster()

    def validate_cluster(self) -> None:
        """The issue-11 options: form only, no I/O (connections are checked by storage.py and cluster.py)."""
        from . import cluster, storage

        cluster.check_address(self.ray_address)
        storage.check_url(self.storage)
        if not self.study_name or not str(self.study_name).strip():
            raise ValueError(f"invalid --study-name {self.study_name!r}; expected a non-empty name")
        if self.heartbeat < 1:
            raise ValueError(f"invalid --heartbeat {self.heartbeat}; expected at least 1 second")


def parse_duration(text: str) -> float:
    """'90s', '30m', '2h' or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    raw = str(text).strip().lower()
    try:
        value = float(raw[:-1]) * units[raw[-1]] if raw[-1:] in units else float(raw)
    except (ValueError, IndexError):
        value = -1
    if value <= 0:
        raise ValueError(f"invalid --time-budget {text!r}; expected a duration such as 90s, 30m or 2h")
    return value


def load_settings(run_dir: Path) -> SearchSettings:
    path = run_dir / "search.yaml"
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} is not a tokennas run folder (no search.yaml)")
    return SearchSettings(**yaml.safe_load(path.read_text()))
