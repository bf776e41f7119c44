"""The report's figures: the Pareto picture (matplotlib) and the HTML page's plotly figures."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import pandas as pd
from optuna.trial import TrialState

from ..config import config_from_dict
from ..flops import format_flops
from ..search.studies import study as S
from .tables import latency_column, measured_column, pareto_mask, ranked

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from plotly.graph_objects import Figure as PlotlyFigure


# proposals with no accuracy, each kind drawn on a row of its own below the accuracy axis, never at accuracy 0
NOT_TRAINED = {"INFEASIBLE": ("over budget, not trained", "#d62728"),
               "REPEAT": ("repeated config, not trained", "#9467bd"),
               "FAIL": ("failed", "#000000"), "INTERRUPTED": ("interrupted", "#8c564b"),
               "WITHDRAWN": ("withdrawn (another driver's turn)", "#bcbd22")}


@dataclasses.dataclass(frozen=True)
class CostAxis:
    """What the accuracy figures put on their x axis: the MACs, or the predicted latency of a ``pareto-latency``
    run; the budget on that axis (None: none) and how the budget line is labelled."""

    column: str = "flops"
    label: str = "FLOPs (multiply-accumulates per image)"
    short: str = "FLOPs (MACs)"
    budget: float | None = None
    budget_text: str = ""
    log: bool = True
    parent: float | None = None  # the parent's own figure on this axis, drawn as a line (measured latency)


def flops_axis(budget: int) -> CostAxis:
    return CostAxis(budget=budget, budget_text=f"budget {format_flops(budget)}")


def cost_axes(settings, frame: pd.DataFrame, parent_ms: float | None = None) -> list[CostAxis]:
    """The accuracy figures' x axes, the first one ``pareto.png``'s: MACs against the ``--flops`` budget; with
    ``--objective pareto-latency``, the latency (ms per forward at ``--latency-batch`` images) measured after the
    search, where the speed step timed the front (``parent_ms``: the parent's, measured beside them), then the
    predicted latency of every proposal, against ``--latency`` (when given)."""
    column = latency_column(frame) if settings.objective == "pareto-latency" else None
    if column is None:
        return [flops_axis(settings.budget)]
    batch = settings.latency_batch
    images = f"{batch} image{'s' * (batch > 1)}"
    budget = (settings.latency, f"budget {settings.latency:g} ms (predicted)" if settings.latency else "")
    axes = [CostAxis(column, f"predicted latency (ms per forward of {images})", f"predicted ms at batch {batch}",
                     *budget, log=False)]
    measured = measured_column(frame)
    if measured is not None and frame[measured].notna().any():
        axes.insert(0, CostAxis(measured, f"measured latency (ms per forward of {images}; timed schedules only)",
                                f"measured ms at batch {batch}", *budget, log=False, parent=parent_ms))
    return axes


def pareto_figure(frame: pd.DataFrame, budget: int, ranking: pd.DataFrame | None = None,
                  axis: CostAxis | None = None) -> Figure:
    """Feasible trials, the Pareto front, the budget line, the baseline and the re-ranked candidates (mean and
    spread over seeds); the over-budget proposals, which have no accuracy, as ticks on a strip underneath. The x axis
    is ``axis`` (default: the MACs against ``budget``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = axis or flops_axis(budget)
    x = axis.column
    frame = frame[frame[x].notna()]  # on a measured axis, only what was timed
    candidates, baseline = frame[frame["role"] == "candidate"], frame[frame["role"] == "baseline"]
    done = candidates[candidates["state"] == "COMPLETE"]
    pruned = candidates[(candidates["state"] == "PRUNED") & candidates["val_acc"].notna()]
    infeasible = candidates[candidates["state"] == "INFEASIBLE"]
    if len(infeasible):
        fig, (ax, strip) = plt.subplots(2, 1, sharex=True, figsize=(7, 5.2), dpi=120,
                                        gridspec_kw={"height_ratios": [7, 1]})
        strip.scatter(infeasible[x], [0] * len(infeasible), marker="|", s=300,
                      color=NOT_TRAINED["INFEASIBLE"][1], alpha=0.6)
        if axis.budget is not None:
            strip.axvline(axis.budget, color="black", ls="--", lw=1)
        strip.set_yticks([])
        strip.set_ylabel(f"over budget,\nnot trained ({len(infeasible)})", rotation=0, ha="right", va="center",
                         fontsize=8)
        strip.set_xlabel(axis.label)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        ax.set_xlabel(axis.label)
    if len(pruned):
        ax.scatter(pruned[x], pruned["val_acc"], color="tab:gray", alpha=0.6, label="stopped early (ASHA)")
    if len(done):
        front = done[pareto_mask(done, cost=x)].sort_values(x)
        shared = "scored" in done and (done["scored"] == "shared weights").all()
        ax.scatter(done[x], done["val_acc"], color="tab:blue",
                   label="scored on shared or parent weights, no training" if shared else "trained")
        ax.step(front[x], front["val_acc"], where="post", color="tab:orange", lw=2, label="Pareto front")
        ax.scatter(front[x], front["val_acc"], color="tab:orange", zorder=3)
    base = baseline[baseline["val_acc"].notna()]  # (its latency is not predicted: off a predicted axis, as above)
    if len(base):
        shared = "scored" in base and (base["scored"] == "shared weights").all()
        ax.scatter(base[x], base["val_acc"], marker="*", s=160, color="tab:green", zorder=4,
                   label="the space's reference (" + ("scored" if shared else "search fidelity") + ")")
    again = ranking[ranking["retrained"]] if ranking is not None and len(ranking) else None
    if again is not None and len(again):
        for role, color, label in (("candidate", "tab:purple", "re-ranked: mean ± sd"),
                                   ("baseline", "tab:green", "baseline re-trained: mean ± sd")):
            part = again[(again["role"] == role) & again[x].notna()]
            if len(part):
                ax.errorbar(part[x], part["val_acc_mean"], yerr=part["val_acc_std"].fillna(0), fmt="D",
                            color=color, mfc="white", capsize=3, zorder=5, label=label)
    if axis.budget is not None:
        ax.axvline(axis.budget, color="black", ls="--", lw=1, label=axis.budget_text)
    if axis.parent is not None:
        ax.axvline(axis.parent, color="tab:red", ls=":", lw=1.5, label=f"parent {axis.parent:.3g} ms")
    if axis.log:
        ax.set_xscale("log")
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_pareto(frame: pd.DataFrame, budget: int, path: Path, ranking: pd.DataFrame | None = None,
                axis: CostAxis | None = None) -> None:
    """``pareto_figure`` saved as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = pareto_figure(frame, budget, ranking, axis)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _with_strip(frame: pd.DataFrame, states: list[str]) -> tuple[PlotlyFigure, pd.DataFrame]:
    """A figure with the accuracy axis on row 1 and, if any proposal of ``states`` exists, a row under it for
    them: they were never trained, so they have no accuracy to be drawn at."""
    from plotly.subplots import make_subplots

    apart = frame[(frame["role"] == "candidate") & frame["state"].isin(states)]
    if apart.empty:
        return make_subplots(rows=1, cols=1), apart
    return make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.85, 0.15], vertical_spacing=0.03), apart


def _draw_apart(figure: PlotlyFigure, apart: pd.DataFrame, x: str) -> None:
    """Each kind of untrained proposal as tick marks on its own line of the lower row, with its legend entry."""
    for state, part in apart.groupby("state", sort=False):
        label, color = NOT_TRAINED[state]
        figure.add_scatter(x=part[x], y=[label] * len(part), mode="markers", name=f"{label} ({len(part)})",
                           marker=dict(symbol="line-ns-open", size=14, color=color),
                           text=[f"trial {n}" for n in part["number"]], row=2, col=1)
    if len(apart):
        figure.update_yaxes(type="category", showgrid=False, row=2, col=1)


def history_figure(frame: pd.DataFrame) -> PlotlyFigure | str:
    """Accuracy by trial number and the best so far; the proposals never trained on a row of their own."""
    candidates = frame[frame["role"] == "candidate"].sort_values("number")
    if candidates.empty:
        return "not available: no candidate was proposed"
    figure, apart = _with_strip(candidates, list(NOT_TRAINED))
    done = candidates[(candidates["state"] == "COMPLETE") & candidates["val_acc"].notna()]
    stopped = candidates[(candidates["state"] == "PRUNED") & candidates["val_acc"].notna()]
    figure.add_scatter(x=done["number"], y=done["val_acc"], mode="markers", name="completed",
                       marker_color="#1f77b4", row=1, col=1)
    if len(stopped):
        figure.add_scatter(x=stopped["number"], y=stopped["val_acc"], mode="markers", name="stopped early",
                           marker_color="#7f7f7f", row=1, col=1)
    figure.add_scatter(x=done["number"], y=done["val_acc"].cummax(), mode="lines", line_shape="hv",
                       name="best so far", line_color="#ff7f0e", row=1, col=1)
    _draw_apart(figure, apart, "number")
    figure.update_yaxes(title_text="validation accuracy", row=1, col=1)
    figure.update_xaxes(title_text="trial", row=2 if len(apart) else 1, col=1)
    return figure


def accuracy_figure(frame: pd.DataFrame, axis: CostAxis) -> PlotlyFigure:
    """Accuracy against the axis' cost: trials, the Pareto front, the baseline, the budget (and the parent) lines, the
    over-budget proposals on a strip underneath; rows with no figure on the axis (not timed) are left out."""
    x = axis.column
    frame = frame[frame[x].notna()]
    done = frame[(frame["state"] == "COMPLETE") & (frame["role"] == "candidate")]
    scatter, apart = _with_strip(frame, ["INFEASIBLE"])
    for state, color in (("COMPLETE", "#1f77b4"), ("PRUNED", "#7f7f7f")):
        part = frame[(frame["state"] == state) & frame["val_acc"].notna() & (frame["role"] == "candidate")]
        scatter.add_scatter(x=part[x], y=part["val_acc"], mode="markers", name=state.lower(),
                            marker_color=color, text=[f"trial {n}" for n in part["number"]], row=1, col=1)
    if len(done):
        front = done[pareto_mask(done, cost=x)].sort_values(x)
        scatter.add_scatter(x=front[x], y=front["val_acc"], mode="lines+markers", name="Pareto front",
                            line_shape="hv", marker_color="#ff7f0e", row=1, col=1)
    base = frame[(frame["role"] == "baseline") & frame["val_acc"].notna()]
    if len(base):
        scatter.add_scatter(x=base[x], y=base["val_acc"], mode="markers", name="the space's reference",
                            marker_symbol="star", marker_size=14, marker_color="#2ca02c", row=1, col=1)
    _draw_apart(scatter, apart, x)
    if axis.budget is not None:
        scatter.add_vline(x=axis.budget, line_dash="dash", annotation_text=axis.budget_text, row=1, col=1)
        if len(apart):  # the line again through the strip, to show which side of it the proposals fell
            scatter.add_vline(x=axis.budget, line_dash="dash", row=2, col=1)
    if axis.parent is not None:
        scatter.add_vline(x=axis.parent, line_dash="dot", line_color="#d62728",
                          annotation_text=f"parent {axis.parent:.3g} ms", row=1, col=1)
    if axis.log:
        scatter.update_xaxes(type="log")
    scatter.update_xaxes(title_text=axis.short, row=2 if len(apart) else 1, col=1)
    scatter.update_yaxes(title_text="validation accuracy", row=1, col=1)
    return scatter


def figures(study: optuna.Study, frame: pd.DataFrame, objective: str, budget: int,
            axes: list[CostAxis] | None = None) -> list[tuple[str, object]]:
    """Plotly figures for the HTML report, each (title, figure or an explanation string); one accuracy figure per
    x axis of ``axes`` (default: the MACs against ``budget``)."""
    import plotly.graph_objects as go
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import plot_param_importances

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no completed trials" is said in the page itself
    done = frame[(frame["state"] == "COMPLETE") & (frame["role"] == "candidate")]
    figures: list[tuple[str, object]] = [(f"Accuracy against {axis.short}", accuracy_figure(frame, axis))
                                         for axis in axes or [flops_axis(budget)]]
    # our own history: Optuna's would draw the over-budget proposals, told to it as value 0, at accuracy 0
    figures.append(("Optimisation history", history_figure(frame)))
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


def rates_figure(rates: pd.DataFrame, budget: int) -> PlotlyFigure:
    """The differentiable strategy's learning (``rates.csv``): the expected patch tokens leaving each block, and the
    expected MACs against the budget, by step."""
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.06)
    for block, part in rates.groupby("block"):
        figure.add_scatter(x=part["step"], y=part["tokens_in"] - part["pruned"] - part["merged"], mode="lines",
                           name=f"block {block}", row=1, col=1)
    macs = rates.drop_duplicates("step")
    figure.add_scatter(x=macs["step"], y=macs["macs"], mode="lines", name="expected MACs", line_color="black",
                       row=2, col=1)
    figure.add_hline(y=budget, line_dash="dash", annotation_text=f"budget {format_flops(budget)}", row=2, col=1)
    figure.update_yaxes(title_text="expected patch tokens out", row=1, col=1)
    figure.update_yaxes(title_text="expected MACs", row=2, col=1)
    figure.update_xaxes(title_text="step", row=2, col=1)
    return figure


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
