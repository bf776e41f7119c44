"""Reports rebuilt from the stored study: trials.csv, retrain.csv, ranking.csv, best/, pareto.png, report.html,
summary.md.

Every file is written to a temporary name and renamed into place, so a report is never half there.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..search.settings import load_settings
from ..search.strategies import get_strategy
from ..search.studies import study as S
from ..search.studies.storage import open_run_study
from ..train import write_atomic
from .export import export_best
from .page import write_html
from .plots import cost_axes, plot_pareto, rates_figure, write_mosaic
from .summary import schedule_lines, summary_markdown
from .tables import final_ranking, measured_column, measured_ms, pareto_mask, retrain_table, trial_table
from .write import write_text


def write_reports(run_dir: Path) -> None:
    """Rebuild every report in ``run_dir`` from its stored studies."""
    settings = load_settings(run_dir)
    strategy = get_strategy(settings.strategy)
    study = open_run_study(run_dir, settings)  # the study may live on a shared server
    runs = S.open_runs(study)
    frame = trial_table(study, runs)
    retrained = retrain_table(runs)
    epochs = strategy.retrain_epochs(settings)
    ranking = final_ranking(frame, retrained, settings.objective, epochs)
    for name, table in (("trials.csv", frame), ("retrain.csv", retrained), ("ranking.csv", ranking)):
        write_atomic(run_dir / name, lambda tmp, t=table: t.to_csv(tmp, index=False))
    best = export_best(study, settings.objective, settings.top, run_dir / "best", epochs)
    # MACs; with --objective pareto-latency, the measured latency of what was timed, then the predicted one of all
    axes = cost_axes(settings, frame, measured_ms(study).get("parent"))
    plot_pareto(frame, settings.budget, run_dir / "pareto.png", ranking, axes[0])
    mosaic = run_dir / "mosaic.png" if write_mosaic(settings, study, frame, run_dir / "mosaic.png") else None
    baseline = study.user_attrs.get("baseline", {"config": None, "note": "not recorded"})
    summary = summary_markdown(settings, frame, ranking, best, baseline, strategy.describe(settings, run_dir),
                               strategy.evaluated, epochs, study.user_attrs.get("stages", {}),
                               _schedules(study, frame, baseline, strategy.evaluated),
                               study.user_attrs.get("latency"))
    rates = run_dir / "rates.csv"  # the differentiable strategy's learning
    extra = [("Learned rates over training (rates.csv)", rates_figure(pd.read_csv(rates), settings.budget))] \
        if rates.is_file() else []
    write_html(study, frame, settings.objective, settings.budget,
               f"tokennas {settings.space} search under {settings.flops} MACs", run_dir / "report.html", mosaic,
               ranking, summary, extra, axes)
    write_text(run_dir / "summary.md", summary)


def _schedules(study, frame, baseline: dict, evaluated: str) -> list[str]:
    """The measured speed of the exported schedules (frozen strategy), when the run recorded it, beside their
    predicted latency when the run predicted one."""
    speed = study.user_attrs.get("speed")
    if not speed:
        return []
    trials = study.get_trials(deepcopy=False)
    configs = {f"trial {t.number}": t.user_attrs["config"] for t in trials if "config" in t.user_attrs}
    predicted = {f"trial {t.number}": t.user_attrs["latency_ms"] for t in trials if "latency_ms" in t.user_attrs}
    accs = {f"trial {int(r.number)}": r.val_acc for r in frame[frame["role"] == "candidate"].itertuples()
            if r.val_acc == r.val_acc}
    if baseline.get("config"):
        configs["reference"] = baseline["config"]
        ref = frame[(frame["role"] == "baseline") & (frame["state"] == "COMPLETE")]
        if len(ref):
            accs["reference"] = float(ref["val_acc"].iloc[0])
    latency = study.user_attrs.get("latency")
    lines = schedule_lines(speed, configs, accs, evaluated, predicted if latency else None,
                           latency["batch"] if latency else None, measured_ms(study))
    return lines + _measured_front(frame, speed, latency["batch"] if latency else None)


def _measured_front(frame: pd.DataFrame, speed: list[dict], batch: int | None) -> list[str]:
    """The Pareto front in measured latency (what ``pareto.png`` draws with ``--objective pareto-latency``), and how
    many of its schedules ran slower than the parent (the paired speed-up at that batch, as the speed table flags)."""
    column = measured_column(frame)
    timed = frame[(frame["role"] == "candidate") & (frame["state"] == "COMPLETE")]
    timed = timed[timed[column].notna()] if column else timed.iloc[:0]
    if timed.empty:
        return []
    front = timed[pareto_mask(timed, cost=column)].sort_values(column)
    speedup = {row["name"]: row["speedup"] for row in speed if row["batch"] == batch}
    cells = ", ".join(f"trial {r.number} ({getattr(r, column):.3g} ms, {r.val_acc:.4f})" for r in front.itertuples())
    slower = sum(speedup[f"trial {n}"] < 1 for n in front["number"])
    return ["", f"Front in measured latency ({column}, pareto.png), among the {len(timed)} schedules timed: {cells}. "
                f"{slower} of its {len(front)} schedules ran slower than the parent at batch {batch}."]
