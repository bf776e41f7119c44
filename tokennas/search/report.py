"""Reports rebuilt from the stored study: trials.csv, best/, pareto.png, report.html, summary.md.

Every file is written to a temporary name and renamed into place, so a report is never half there.
"""

from __future__ import annotations

import base64
import html
import shutil
import tempfile
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from ..config import config_from_dict, save_config
from ..flops import format_flops
from . import study as S
from .settings import load_settings
from .storage import open_run_study


def trial_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial. ``state`` is Optuna's, except over-budget proposals (INFEASIBLE) and proposals
    of an already trained candidate (REPEAT, ``repeat_of`` names it); neither was trained."""
    rows = []
    for t in study.trials:
        state = "INFEASIBLE" if S.is_infeasible(t) else "REPEAT" if S.is_repeat(t) else \
            "WITHDRAWN" if t.user_attrs.get("withdrawn") else t.state.name
        seconds = t.user_attrs.get("seconds")
        if seconds is None and t.datetime_complete and t.datetime_start:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        rows.append({"number": t.number, "state": state, "flops": t.user_attrs.get("flops"),
                     "params": t.user_attrs.get("params"), "val_acc": t.user_attrs.get("val_acc"),
                     "epochs": t.user_attrs.get("epochs", 0), "seconds": seconds,
                     "repeat_of": t.user_attrs.get("repeat_of"), "node": t.user_attrs.get("node"),
                     **{f"param_{k}": v for k, v in t.params.items()}})
    columns = ["number", "state", "flops", "params", "val_acc", "epochs", "seconds", "repeat_of", "node"]
    return pd.DataFrame(rows, columns=None if rows else columns)


def pareto_mask(frame: pd.DataFrame) -> pd.Series:
    """Non-dominated rows: no other row has at least the accuracy at no more FLOPs, and better in one."""
    acc, flops = frame["val_acc"].to_numpy(), frame["flops"].to_numpy()
    return pd.Series([not ((acc >= a) & (flops <= f) & ((acc > a) | (flops < f))).any() for a, f in zip(acc, flops,
                                                                                                     strict=True)],
                     index=frame.index)


def ranked(frame: pd.DataFrame, objective: str) -> pd.DataFrame:
    """Feasible fully trained trials, best first: by accuracy, or the Pareto front first in Pareto mode."""
    done = frame[frame["state"] == "COMPLETE"].copy()
    if done.empty:
        return done
    done["pareto"] = pareto_mask(done)
    if objective == "pareto":
        return done.sort_values(["pareto", "val_acc", "flops"], ascending=[False, False, True])
    return done.sort_values(["val_acc", "flops"], ascending=[False, True])


def export_best(study: optuna.Study, objective: str, top: int, out: Path) -> list[Path]:
    """Write the ``top`` best configs as ``01-trialN-FLOPs.yaml``...; returns their paths."""
    best = ranked(trial_table(study), objective).head(top)
    trials = {t.number: t for t in study.trials}
    staging = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None, prefix=".best-"))
    staging.chmod(0o755)
    paths = []
    for rank, row in enumerate(best.itertuples(), start=1):
        trial = trials[row.number]
        name = f"{rank:02d}-trial{row.number}-{format_flops(row.flops)}.yaml"
        save_config(config_from_dict(trial.user_attrs["config"]), staging / name)
        paths.append(out / name)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return paths


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def plot_pareto(frame: pd.DataFrame, budget: int, path: Path) -> None:
    """Feasible trials, the Pareto front, the budget line and the over-budget proposals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    done = frame[frame["state"] == "COMPLETE"]
    pruned = frame[(frame["state"] == "PRUNED") & frame["val_acc"].notna()]
    infeasible = frame[frame["state"] == "INFEASIBLE"]
    floor = min([0.0, *frame["val_acc"].dropna()]) if len(frame) else 0.0
    if len(infeasible):
        ax.scatter(infeasible["flops"], [floor] * len(infeasible), marker="x", color="tab:red", alpha=0.5,
                   label=f"over budget, not trained ({len(infeasible)})")
    if len(pruned):
        ax.scatter(pruned["flops"], pruned["val_acc"], color="tab:gray", alpha=0.6, label="stopped early (ASHA)")
    if len(done):
        front = done[pareto_mask(done)].sort_values("flops")
        ax.scatter(done["flops"], done["val_acc"], color="tab:blue", label="trained")
        ax.step(front["flops"], front["val_acc"], where="post", color="tab:orange", lw=2, label="Pareto front")
        ax.scatter(front["flops"], front["val_acc"], color="tab:orange", zorder=3)
    ax.axvline(budget, color="black", ls="--", lw=1, label=f"budget {format_flops(budget)}")
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs (multiply-accumulates per image)")
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _figures(study: optuna.Study, frame: pd.DataFrame, objective: str, budget: int) -> list[tuple[str, object]]:
    """Plotly figures for the HTML report, each (title, figure or an explanation string)."""
    import plotly.graph_objects as go
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import plot_optimization_history, plot_param_importances

    figures: list[tuple[str, object]] = []
    done = frame[frame["state"] == "COMPLETE"]
    scatter = go.Figure()
    for state, color in (("COMPLETE", "#1f77b4"), ("PRUNED", "#7f7f7f")):
        part = frame[(frame["state"] == state) & frame["val_acc"].notna()]
        scatter.add_scatter(x=part["flops"], y=part["val_acc"], mode="markers", name=state.lower(),
                            marker_color=color, text=[f"trial {n}" for n in part["number"]])
    if len(done):
        front = done[pareto_mask(done)].sort_values("flops")
        scatter.add_scatter(x=front["flops"], y=front["val_acc"], mode="lines+markers", name="Pareto front",
                            line_shape="hv", marker_color="#ff7f0e")
    scatter.add_vline(x=budget, line_dash="dash", annotation_text=f"budget {format_flops(budget)}")
    scatter.update_layout(xaxis_title="FLOPs (MACs)", yaxis_title="validation accuracy", xaxis_type="log")
    figures.append(("Accuracy against FLOPs", scatter))

    target = (lambda t: t.values[0]) if objective == "pareto" else None
    try:
        figures.append(("Optimisation history", plot_optimization_history(study, target=target,
                                                                          target_name="val_acc")))
    except (ValueError, RuntimeError) as err:
        figures.append(("Optimisation history", f"not available: {err}"))
    feasible = [t for t in study.trials if t.state == TrialState.COMPLETE and S.trained(t)]
    try:  # importances over trained candidates only: over-budget ones would only explain the budget
        only = optuna.create_study(directions=study.directions)
        only.add_trials(feasible)
        figures.append(("Parameter importances (trained candidates)",
                        plot_param_importances(only, evaluator=FanovaImportanceEvaluator(seed=0),
                                               target=lambda t: t.values[0], target_name="val_acc")))
    except (ValueError, RuntimeError, ZeroDivisionError, ImportError) as err:
        figures.append(("Parameter importances", f"not available with {len(feasible)} trained candidates: {err}"))

    schedule = go.Figure()
    trials = {t.number: t for t in study.trials}
    for number in ranked(frame, objective).query("pareto")["number"] if len(done) else []:
        config = config_from_dict(trials[number].user_attrs["config"])
        for stream, tokens in config.tokens_per_block().items():
            label = f"trial {number}" + (f" ({stream})" if len(config.tokens_per_block()) > 1 else "")
            schedule.add_scatter(x=list(range(len(tokens))), y=list(tokens), mode="lines+markers", name=label,
                                 line_shape="hv")
    schedule.update_layout(xaxis_title="block", yaxis_title="tokens", yaxis_type="log")
    figures.append(("Tokens per block of each Pareto config", schedule))
    return figures


def write_mosaic(settings, study: optuna.Study, frame: pd.DataFrame, path: Path) -> bool:
    """For a quadtree search: the best config's mosaic over a few validation images. False if not applicable."""
    best = ranked(frame, settings.objective).head(1)
    if best.empty:
        return False
    config = config_from_dict(study.trials[int(best["number"].iloc[0])].user_attrs["config"])
    if config.family != "quadformer":
        return False
    import torch

    from ..data import TensorSplit, load_data
    from ..models.quadtree import draw_mosaic

    data = load_data(settings.dataset, settings.data_dir, settings.img_size, settings.train_subset, seed=settings.seed)
    val = data.val
    images = val.images[:8] if isinstance(val, TensorSplit) else torch.stack([val[i][0] for i in range(8)])
    tmp = path.with_name(f".{path.stem}.tmp.png")
    draw_mosaic(config, images, tmp)
    tmp.replace(path)
    return True


def write_html(study: optuna.Study, frame: pd.DataFrame, objective: str, budget: int, title: str, path: Path,
               mosaic: Path | None = None) -> None:
    """One self-contained page: plotly.js is inlined once, the mosaic picture (if any) as data."""
    parts, plotly_js = [], "inline"
    if mosaic is not None:
        data = base64.b64encode(mosaic.read_bytes()).decode()
        parts.append("<h2>Mosaic of the best config over validation images</h2>"
                     f"<img src='data:image/png;base64,{data}'>")
    for heading, figure in _figures(study, frame, objective, budget):
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(figure, str):
            parts.append(f"<p>{html.escape(figure)}</p>")
        else:
            parts.append(figure.to_html(full_html=False, include_plotlyjs=plotly_js))
            plotly_js = False
    parts.append("<h2>Trials</h2>" + frame.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}"))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>")
    _write(path, page)


def summary_markdown(settings, frame: pd.DataFrame, best: list[Path], baseline) -> str:
    counts = frame["state"].value_counts().to_dict() if len(frame) else {}
    lines = [f"# tokennas search: {settings.space} under {settings.flops} MACs", "",
             f"- objective: {settings.objective}, sampler: {settings.sampler}, scheduler: {settings.scheduler}, "
             f"seed: {settings.seed}",
             f"- data: {settings.dataset} at {settings.img_size}px, train subset: {settings.train_subset or 'all'}, "
             f"epochs per candidate: {settings.epochs}",
             f"- trials: {counts.get('COMPLETE', 0)} complete, {counts.get('PRUNED', 0)} stopped early, "
             f"{counts.get('FAIL', 0)} failed, {counts.get('INFEASIBLE', 0)} proposals over budget and "
             f"{counts.get('REPEAT', 0)} repeated proposals (neither trained)",
             ""]
    ranked_rows = ranked(frame, settings.objective).head(len(best))
    if len(ranked_rows):
        lines += ["| rank | trial | val_acc | FLOPs | params | config |", "|---|---|---|---|---|---|"]
        for rank, (row, path) in enumerate(zip(ranked_rows.itertuples(), best, strict=True), start=1):
            lines.append(f"| {rank} | {row.number} | {row.val_acc:.4f} | {format_flops(row.flops)} | "
                         f"{row.params / 1e6:.3f}M | best/{path.name} |")
    else:
        lines.append("No candidate finished training yet.")
    if baseline is not None:
        lines += ["", f"Uniform DeiT-style baseline within the budget (not trained here): width {baseline.embed_dim}, "
                      f"depth {baseline.depth}, heads {baseline.num_heads}, "
                      f"{format_flops(sum(baseline.flops_by_module().values()))} MACs."]
    return "\n".join(lines) + "\n"


def write_reports(run_dir: Path) -> None:
    """Rebuild every report in ``run_dir`` from its stored study."""
    from ..spaces import Inputs, get_space

    settings = load_settings(run_dir)
    study = open_run_study(run_dir, settings)  # issue 11: the study may live on a shared server
    frame = trial_table(study)
    tmp = run_dir / ".trials.csv.tmp"
    frame.to_csv(tmp, index=False)
    tmp.replace(run_dir / "trials.csv")
    best = export_best(study, settings.objective, settings.top, run_dir / "best")
    plot_pareto(frame, settings.budget, run_dir / "pareto.png")
    mosaic = run_dir / "mosaic.png" if write_mosaic(settings, study, frame, run_dir / "mosaic.png") else None
    write_html(study, frame, settings.objective, settings.budget,
               f"tokennas {settings.space} search under {settings.flops} MACs", run_dir / "report.html", mosaic)
    configs = [t.user_attrs.get("config") for t in study.trials if t.user_attrs.get("config")]
    inputs = Inputs(settings.img_size, configs[0]["in_chans"], configs[0]["num_classes"]) if configs else Inputs(
        settings.img_size)
    baseline = get_space(settings.space).baseline(settings.budget, inputs)
    _write(run_dir / "summary.md", summary_markdown(settings, frame, best, baseline))
