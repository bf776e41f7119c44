"""How candidates are scored: one strategy per file, registered here, known to the driver only by this protocol.

A strategy owns its search stage (how candidates are proposed to Ray or scored in process), the options only it
reads, what it checks before anything is written, how a re-ranking run starts, and how the summary describes it.
The driver (``search/run.py``) never asks which strategy it holds. A new strategy is one new file in this folder
plus one line in ``STRATEGIES``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ...config import ModelConfig
from ..settings import SearchSettings
from ..stages import Prepared, StageContext


class Strategy(Protocol):
    name: str
    stall: int  # over-budget or repeated proposals in a row before the sampler is handed an untried candidate
    evaluated: str  # how a candidate's search accuracy is obtained, in the summary's words: "trained", "scored"
    options: tuple[str, ...]  # settings only this strategy reads; another strategy refuses them
    no_retrain: str  # why there is no re-ranking when ``retrain_epochs`` is 0, in the summary's words
    score_images: int  # the default of --score-images under this strategy (SearchSettings' when it scores nothing)

    def validate(self, settings: SearchSettings) -> None:
        """Its options, in form only (no I/O): a ``ValueError`` naming the first bad one."""

    def check(self, settings: SearchSettings, prepared: Prepared) -> None:
        """Everything it needs, before anything is written; may set ``prepared.baseline`` to None with a note
        when it cannot evaluate the space's uniform baseline."""

    def search_stage(self, ctx: StageContext) -> None:
        """Evaluate candidates until ``--trials`` are done, the failures stop the run or the deadline passes."""

    def unfinished(self, ctx: StageContext) -> str | None:
        """What its search stage still has to do once every candidate was evaluated (e.g. time the exported
        schedules), in the summary's words; None: nothing. A resume runs the stage again while it says something."""

    def retrain_start(self, settings: SearchSettings, run_dir: Path, config: ModelConfig) -> dict[str, Any] | None:
        """Extra keys of a re-ranking job for ``config`` (e.g. the weights it starts from); None: it cannot be
        re-ranked this way (the summary says so)."""

    def search_epochs(self, settings: SearchSettings) -> int:
        """Epochs a candidate (and the baseline) is trained for in the search stage; 0 when it is only scored."""

    def retrain_epochs(self, settings: SearchSettings) -> int:
        """Epochs of each re-ranking run; 0: the strategy re-ranks nothing with these settings (``no_retrain``)."""

    def describe(self, settings: SearchSettings, run_dir: Path) -> list[str]:
        """Summary lines: how candidates were evaluated and how re-ranking runs start."""


from .differentiable import Differentiable  # noqa: E402  (the registry: one line per strategy)
from .frozen import Frozen  # noqa: E402
from .oneshot import OneShot  # noqa: E402
from .standalone import Standalone  # noqa: E402

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (Standalone(), OneShot(), Frozen(), Differentiable())}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"invalid --strategy {name!r}; expected one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def validate(settings: SearchSettings) -> Strategy:
    """The strategy the settings name, with its options checked; another strategy's options are refused."""
    import dataclasses

    strategy = get_strategy(settings.strategy)
    defaults = {f.name: f.default for f in dataclasses.fields(SearchSettings)}
    for other in STRATEGIES.values():
        for name in other.options:
            if name not in strategy.options and getattr(settings, name) != defaults[name]:
                raise ValueError(f"--{name.replace('_', '-')} needs --strategy {other.name}")
    if settings.objective == "pareto-latency" and "latency_batch" not in strategy.options:
        latency = [s.name for s in STRATEGIES.values() if "latency_batch" in s.options]
        raise ValueError(f"invalid --objective pareto-latency for --strategy {strategy.name}; expected acc or pareto "
                         f"(predicted latency needs --strategy {' or '.join(latency)})")
    strategy.validate(settings)
    return strategy
