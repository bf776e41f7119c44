"""Exported configs: ``best/`` and ``tokennas export``, never touching a file the user wrote."""

from __future__ import annotations

from pathlib import Path

import optuna

from ..config import config_from_dict, save_config
from ..flops import format_flops
from ..search.studies import study as S
from ..train import write_atomic
from .tables import final_ranking, retrain_table, trial_table
from .write import write_text

EXPORT_MARK = ".tokennas-export"  # lists the files an export wrote: the only ones a later export may touch


def _listed(marker: Path) -> set[str]:
    """The file names a previous export recorded; a path or a hidden name was never written by us."""
    return {name for name in marker.read_text().split() if Path(name).name == name and not name.startswith(".")}


def write_export(entries: list[tuple[str, dict]], out: Path) -> list[Path]:
    """Write ``(file name, config)`` pairs into ``out`` and remove only the files of the previous export.

    ``out`` must be new, empty, or a previous export (it holds the ``.tokennas-export`` list); only the files
    in that list are replaced or removed, and a new name that is someone else's file is refused. Everything is
    checked before anything is written, so a refusal leaves ``out`` as it was."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; expected a folder for the exported configs")
    marker = out / EXPORT_MARK
    previous: set[str] = set()
    if out.is_dir():
        present = sorted(p.name for p in out.iterdir())
        if marker.is_file():
            previous = _listed(marker)
            clash = [name for name, _ in entries if name in present and name not in previous]
            if clash:
                raise ValueError(f"--out {str(out)!r} already holds {clash[0]!r}, which no tokennas export "
                                 "wrote; move it away or export into another folder")
        elif present:
            raise ValueError(f"--out {str(out)!r} holds files that are not a tokennas export (e.g. "
                             f"{present[0]!r}); expected a new or empty folder, or a previous export")
    out.mkdir(parents=True, exist_ok=True)
    names = [name for name, _ in entries]
    # listed before they are written: a crash part-way leaves no file of ours that the list does not own
    write_text(marker, "\n".join(sorted(previous | set(names))) + "\n")
    paths = []
    for name, config in entries:
        paths.append(write_atomic(out / name, lambda tmp, c=config: save_config(config_from_dict(c), tmp)))
    for name in previous - set(names):
        if (out / name).is_file():
            (out / name).unlink()
    write_text(marker, "\n".join(names) + "\n")
    return paths


def export_best(study: optuna.Study, objective: str, top: int, out: Path, epochs: int | None = None) -> list[Path]:
    """Write the ``top`` best configs of the final ranking as ``01-trialN-FLOPs.yaml``...; returns their paths.
    The baseline is a reference, never exported."""
    runs = S.open_runs(study)
    frame = trial_table(study, runs)
    best = final_ranking(frame, retrain_table(runs), objective, epochs)
    best = best[best["role"] == "candidate"].head(top)
    trials = {t.number: t for t in study.trials}
    entries = [(f"{rank:02d}-trial{row.number}-{format_flops(row.flops)}.yaml",
                trials[int(row.number)].user_attrs["config"]) for rank, row in enumerate(best.itertuples(), start=1)]
    return write_export(entries, out)
