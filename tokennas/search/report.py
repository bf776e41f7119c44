"""Reports rebuilt from the stored study: trials.csv, best/, pareto.png, report.html, summary.md.

Every file is written to a temporary name and renamed into place, so a report is never half there.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from ..config import config_from_dict, save_config
from ..flops import format_flops
from . import study as S
from .settings import load_settings
from .storage import open_run_study


def _state(t) -> str:
    if S.is_infeasible(t):
        return "INFEASIBLE"
    if S.is_repeat(t):
        return "REPEAT"
    if t.state == TrialState.FAIL and "interrupted" in t.user_attrs:
        return "INTERRUPTED"
    if t.user_attrs.get("withdrawn"):  # another driver of a shared study took its turn first
        return "WITHDRAWN"
    return t.state.name


def _reason(t) -> str | None:
    if "error" in t.user_attrs:
        return t.user_attrs["error"]
    if "interrupted" in t.user_attrs and t.state == TrialState.FAIL:
        return f"interrupted: {t.user_attrs['interrupted']}"
    return None


def _scored(t) -> str | None:
    """How a trial's accuracy was obtained: on a supernet's shared weights (one-shot) or by training."""
    if t.user_attrs.get("val_acc") is None:
        return None
    return "shared weights" if t.user_attrs.get("shared") else "trained"


def _seconds(t) -> float | None:
    seconds = t.user_attrs.get("seconds")
    if seconds is None and t.datetime_complete and t.datetime_start:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds()
    return seconds


def trial_table(study: optuna.Study, runs: optuna.Study | None = None) -> pd.DataFrame:
    """One row per trial of the search stage. ``state`` is Optuna's, except over-budget proposals
    (INFEASIBLE), proposals of an already trained config (REPEAT, ``repeat_of`` names it) and trials cut off
    before their last epoch (INTERRUPTED, asked again on ``--resume``). ``error`` says why a trial failed.
    The uniform baseline's reference run, when given ``runs``, is the row with ``role`` baseline."""
    rows = []
    for t in study.trials:
        rows.append({"number": t.number, "role": "candidate", "state": _state(t), "flops": t.user_attrs.get("flops"),
                     "params": t.user_attrs.get("params"), "val_acc": t.user_attrs.get("val_acc"),
                     "epochs": t.user_attrs.get("epochs", 0), "seconds": _seconds(t),
                     "repeat_of": t.user_attrs.get("repeat_of"), "error": _reason(t), "node": t.user_attrs.get("node"),
                     "scored": _scored(t), **{f"param_{k}": v for k, v in t.params.items()}})
    for t in _runs(runs, "search"):
        rows.append({"number": None, "role": "baseline", "state": _state(t), "flops": t.user_attrs.get("flops"),
                     "params": t.user_attrs.get("params"), "val_acc": t.user_attrs.get("val_acc"),
                     "epochs": len(t.user_attrs.get("history", [])), "seconds": _seconds(t), "repeat_of": None,
                     "error": _reason(t), "node": t.user_attrs.get("node"), "scored": _scored(t)})
    columns = ["number", "role", "state", "flops", "params", "val_acc", "epochs", "seconds", "repeat_of", "error",
               "node", "scored"]
    frame = pd.DataFrame(rows, columns=None if rows else columns)
    frame["number"] = frame["number"].astype("Int64")
    frame["repeat_of"] = frame["repeat_of"].astype("Int64")
    params = [c for c in frame.columns if c.startswith("param_")]
    frame[params] = frame[params].convert_dtypes()  # the baseline row has no parameters: keep 96, not 96.0
    return frame


def _runs(runs: optuna.Study | None, stage: str) -> list:
    """The runs of a stage; a run withdrawn because another driver of a shared study took it is not one."""
    return [t for t in (runs.trials if runs is not None else [])
            if t.user_attrs.get("stage") == stage and not t.user_attrs.get("withdrawn")]


def retrain_table(runs: optuna.Study) -> pd.DataFrame:
    """One row per re-ranking run: which candidate (a trial number, or baseline), which seed, its outcome."""
    rows = [{"source": t.user_attrs.get("source"), "role": t.user_attrs.get("role"), "seed": t.user_attrs.get("seed"),
             "state": _state(t), "flops": t.user_attrs.get("flops"), "params": t.user_attrs.get("params"),
             "val_acc": t.user_attrs.get("val_acc"), "epochs": len(t.user_attrs.get("history", [])),
             "seconds": _seconds(t), "error": _reason(t), "node": t.user_attrs.get("node"),
             "start": "supernet weights" if t.user_attrs.get("init") else "scratch"}
            for t in _runs(runs, "retrain")]
    return pd.DataFrame(rows, columns=["source", "role", "seed", "state", "flops", "params", "val_acc", "epochs",
                                       "seconds", "error", "node", "start"])


def pareto_mask(frame: pd.DataFrame, acc: str = "val_acc") -> pd.Series:
    """Non-dominated rows: no other row has at least the accuracy at no more FLOPs, and better in one."""
    accs, flops = frame[acc].to_numpy(dtype=float), frame["flops"].to_numpy(dtype=float)
    return pd.Series([not ((accs >= a) & (flops <= f) & ((accs > a) | (flops < f))).any()
                      for a, f in zip(accs, flops, strict=True)], index=frame.index)


def ranked(frame: pd.DataFrame, objective: str) -> pd.DataFrame:
    """Feasible fully trained candidates, best first: by accuracy, or the Pareto front first in Pareto mode."""
    done = frame[(frame["state"] == "COMPLETE") & (frame["role"] == "candidate")].copy()
    if done.empty:
        return done
    done["pareto"] = pareto_mask(done)
    if objective == "pareto":
        return done.sort_values(["pareto", "val_acc", "flops"], ascending=[False, False, True])
    return done.sort_values(["val_acc", "flops"], ascending=[False, True])


def final_ranking(frame: pd.DataFrame, retrained: pd.DataFrame, objective: str) -> pd.DataFrame:
    """The search's candidates re-ranked by their mean validation accuracy over the re-ranking seeds.

    Retrained candidates come first (by mean, or by the front of mean accuracy against FLOPs in Pareto
    mode); the rest follow in the search's order. ``val_acc_mean``/``val_acc_std``/``seeds`` are the
    re-ranking figures (empty when a candidate was not retrained); the baseline has a row of its own."""
    search = ranked(frame, objective)
    done = retrained[retrained["state"] == "COMPLETE"]
    stats = done.groupby("source")["val_acc"].agg(["mean", "std", "count"])
    rows = []
    for row in search.itertuples():
        key = int(row.number)
        have = stats.loc[key] if key in stats.index else None
        rows.append({"number": key, "role": "candidate", "flops": row.flops, "params": row.params,
                     "search_val_acc": row.val_acc, "val_acc_mean": None if have is None else have["mean"],
                     "val_acc_std": None if have is None else have["std"],
                     "seeds": 0 if have is None else int(have["count"])})
    if "baseline" in stats.index:
        base = done[done["source"] == "baseline"].iloc[0]
        searched = frame[frame["role"] == "baseline"]["val_acc"]
        rows.append({"number": None, "role": "baseline", "flops": base.flops, "params": base.params,
                     "search_val_acc": searched.iloc[0] if len(searched) else None,
                     "val_acc_mean": stats.loc["baseline", "mean"], "val_acc_std": stats.loc["baseline", "std"],
                     "seeds": int(stats.loc["baseline", "count"])})
    table = pd.DataFrame(rows, columns=["number", "role", "flops", "params", "search_val_acc", "val_acc_mean",
                                        "val_acc_std", "seeds"])
    if table.empty:
        return table
    table["number"] = table["number"].astype("Int64")
    table["retrained"] = table["seeds"] > 0
    table["score"] = table["val_acc_mean"].where(table["retrained"], table["search_val_acc"]).astype(float)
    if objective == "pareto":
        table["pareto"] = False
        if table["retrained"].any():
            table.loc[table["retrained"], "pareto"] = pareto_mask(table[table["retrained"]], "score").astype(bool)
        keys, ascending = ["retrained", "pareto", "score", "flops"], [False, False, False, True]
    else:
        keys, ascending = ["retrained", "score", "flops"], [False, False, True]
    return table.sort_values(keys, ascending=ascending).reset_index(drop=True)


EXPORT_MARK = ".tokennas-export"
EXPORT_NAME = re.compile(r"^\d{2}-.+\.yaml$")


def write_export(entries: list[tuple[str, dict]], out: Path) -> list[Path]:
    """Write ``(file name, config)`` pairs into ``out`` and remove only the files of the previous export.

    ``out`` must be new, empty, or a previous export (it holds the ``.tokennas-export`` list, or only files
    named like exported configs); anything else is refused, so nothing a user wrote is ever deleted."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; expected a folder for the exported configs")
    marker = out / EXPORT_MARK
    previous: list[str] = []
    if out.is_dir():
        present = [p.name for p in out.iterdir()]
        if marker.is_file():
            previous = marker.read_text().split()
        elif present and all(EXPORT_NAME.match(name) for name in present):
            previous = present
        elif present:
            raise ValueError(f"--out {str(out)!r} holds files that are not a tokennas export (e.g. "
                             f"{sorted(present)[0]!r}); expected a new or empty folder, or a previous export")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, config in entries:
        tmp = out / f".{name}.tmp"
        save_config(config_from_dict(config), tmp)
        tmp.replace(out / name)
        paths.append(out / name)
    for name in set(previous) - {p.name for p in paths}:
        if EXPORT_NAME.match(name) and (out / name).is_file():
            (out / name).unlink()
    _write(marker, "\n".join(p.name for p in paths) + "\n")
    return paths


def export_best(study: optuna.Study, objective: str, top: int, out: Path) -> list[Path]:
    """Write the ``top`` best configs of the final ranking as ``01-trialN-FLOPs.yaml``...; returns their paths.
    The baseline is a reference, never exported."""
    runs = S.open_runs(study)
    frame = trial_table(study, runs)
    best = final_ranking(frame, retrain_table(runs), objective)
    best = best[best["role"] == "candidate"].head(top)
    trials = {t.number: t for t in study.trials}
    entries = [(f"{rank:02d}-trial{row.number}-{format_flops(row.flops)}.yaml",
                trials[int(row.number)].user_attrs["config"]) for rank, row in enumerate(best.itertuples(), start=1)]
    return write_export(entries, out)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def plot_pareto(frame: pd.DataFrame, budget: int, path: Path, ranking: pd.DataFrame | None = None) -> None:
    """Feasible trials, the Pareto front, the budget line, the over-budget proposals, the baseline and the
    re-ranked candidates (mean and spread over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    candidates, baseline = frame[frame["role"] == "candidate"], frame[frame["role"] == "baseline"]
    done = candidates[candidates["state"] == "COMPLETE"]
    pruned = candidates[(candidates["state"] == "PRUNED") & candidates["val_acc"].notna()]
    infeasible = candidates[candidates["state"] == "INFEASIBLE"]
    floor = min([0.0, *frame["val_acc"].dropna()]) if len(frame) else 0.0
    if len(infeasible):
        ax.scatter(infeasible["flops"], [floor] * len(infeasible), marker="x", color="tab:red", alpha=0.5,
                   label=f"over budget, not trained ({len(infeasible)})")
    if len(pruned):
        ax.scatter(pruned["flops"], pruned["val_acc"], color="tab:gray", alpha=0.6, label="stopped early (ASHA)")
    if len(done):
        front = done[pareto_mask(done)].sort_values("flops")
        shared = "scored" in done and (done["scored"] == "shared weights").all()
        ax.scatter(done["flops"], done["val_acc"], color="tab:blue",
                   label="scored on shared weights" if shared else "trained")
        ax.step(front["flops"], front["val_acc"], where="post", color="tab:orange", lw=2, label="Pareto front")
        ax.scatter(front["flops"], front["val_acc"], color="tab:orange", zorder=3)
    base = baseline[baseline["val_acc"].notna()]
    if len(base):
        shared = "scored" in base and (base["scored"] == "shared weights").all()
        ax.scatter(base["flops"], base["val_acc"], marker="*", s=160, color="tab:green", zorder=4,
                   label="uniform baseline (" + ("on shared weights" if shared else "search fidelity") + ")")
    again = ranking[ranking["retrained"]] if ranking is not None and len(ranking) else None
    if again is not None and len(again):
        for role, color, label in (("candidate", "tab:purple", "re-ranked: mean ± sd"),
                                   ("baseline", "tab:green", "baseline re-trained: mean ± sd")):
            part = again[again["role"] == role]
            if len(part):
                ax.errorbar(part["flops"], part["val_acc_mean"], yerr=part["val_acc_std"].fillna(0), fmt="D",
                            color=color, mfc="white", capsize=3, zorder=5, label=label)
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

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no completed trials" is said in the page itself
    figures: list[tuple[str, object]] = []
    done = frame[(frame["state"] == "COMPLETE") & (frame["role"] == "candidate")]
    scatter = go.Figure()
    for state, color in (("COMPLETE", "#1f77b4"), ("PRUNED", "#7f7f7f")):
        part = frame[(frame["state"] == state) & frame["val_acc"].notna() & (frame["role"] == "candidate")]
        scatter.add_scatter(x=part["flops"], y=part["val_acc"], mode="markers", name=state.lower(),
                            marker_color=color, text=[f"trial {n}" for n in part["number"]])
    if len(done):
        front = done[pareto_mask(done)].sort_values("flops")
        scatter.add_scatter(x=front["flops"], y=front["val_acc"], mode="lines+markers", name="Pareto front",
                            line_shape="hv", marker_color="#ff7f0e")
    base = frame[(frame["role"] == "baseline") & frame["val_acc"].notna()]
    if len(base):
        scatter.add_scatter(x=base["flops"], y=base["val_acc"], mode="markers", name="uniform baseline",
                            marker_symbol="star", marker_size=14, marker_color="#2ca02c")
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
               mosaic: Path | None = None, ranking: pd.DataFrame | None = None, summary: str = "") -> None:
    """One self-contained page: plotly.js is inlined once, the mosaic picture (if any) as data."""
    parts, plotly_js = [], "inline"
    if summary:
        parts.append(f"<pre>{html.escape(summary)}</pre>")
    if ranking is not None and len(ranking):
        parts.append("<h2>Final ranking (re-ranked on more seeds; the baseline is the uniform reference)</h2>"
                     + ranking.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}"))
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


def _acc(mean, std, seeds) -> str:
    if seeds == 0 or pd.isna(mean):
        return ""
    return f"{mean:.4f} ± {0.0 if pd.isna(std) else std:.4f} ({seeds} seed{'s' if seeds != 1 else ''})"


def _strategy_lines(settings, supernet: dict | None) -> list[str]:
    if settings.strategy != "oneshot":
        return [f"- strategy: standalone, every candidate trained for up to {settings.epochs} epochs",
                f"- re-ranking: the top {settings.retrain_top} and the baseline, {settings.retrain_epochs} epochs, "
                f"{settings.retrain_seeds} seeds each, from scratch; selection on the validation split only"]
    if supernet is None:
        origin = "not built yet"
    elif supernet.get("epochs"):
        origin = (f"trained {supernet['epochs']} epochs in this run (sandwich rule)"
                  + (f" from --parent {supernet['parent']}" if supernet.get("parent") else " from scratch"))
    else:
        origin = f"--parent {supernet.get('parent')} as it is"
    start = (f"fine-tuned {settings.finetune_epochs} epochs from their inherited weights" if settings.finetune_epochs
             else f"trained {settings.retrain_epochs} epochs from scratch")
    return [f"- strategy: one-shot; candidates scored on the shared weights of supernet.pt ({origin}), on the first "
            f"{settings.score_images} validation images, with no training of their own (`scored` in trials.csv)",
            f"- re-ranking: the top {settings.retrain_top} and the baseline {start}, {settings.retrain_seeds} seeds "
            "each; selection on the validation split only"]


def summary_markdown(settings, frame: pd.DataFrame, ranking: pd.DataFrame, best: list[Path], baseline,
                     supernet: dict | None = None) -> str:
    candidates = frame[frame["role"] == "candidate"]
    counts = candidates["state"].value_counts().to_dict() if len(candidates) else {}
    scored = "scored" if settings.strategy == "oneshot" else "trained"
    lines = [f"# tokennas search: {settings.space} under {settings.flops} MACs", "",
             f"- objective: {settings.objective}, sampler: {settings.sampler}, scheduler: {settings.scheduler}, "
             f"seed: {settings.seed}",
             f"- data: {settings.dataset} at {settings.img_size}px, train subset: {settings.train_subset or 'all'}",
             f"- trials: {counts.get('COMPLETE', 0)} complete, {counts.get('PRUNED', 0)} stopped early, "
             f"{counts.get('FAIL', 0)} failed, {counts.get('INTERRUPTED', 0)} interrupted, "
             f"{counts.get('INFEASIBLE', 0)} proposals over budget and "
             f"{counts.get('REPEAT', 0)} repeated configs (neither {scored})",
             *_strategy_lines(settings, supernet), ""]
    failed = candidates[candidates["state"] == "FAIL"]
    if len(failed):
        lines += [f"First failure: trial {failed.iloc[0]['number']}: {failed.iloc[0]['error']}", ""]
    if len(ranking):
        lines += ["| rank | trial | val_acc re-ranked (mean ± sd, seeds) | val_acc in search | FLOPs | params "
                  "| config |", "|---|---|---|---|---|---|---|"]
        shown = ranking[ranking["retrained"] | (ranking["role"] == "candidate")]
        shown = shown[shown["retrained"] | (shown.groupby("role").cumcount() < settings.top)]
        exported = {p.name.split("-")[1]: p for p in best}  # "trialN" -> path
        rank = 0
        for row in shown.itertuples():
            if row.role == "baseline":
                name, config, position = "baseline", "(reference, not exported)", ""
            else:
                rank += 1
                path = exported.get(f"trial{row.number}")
                name, config, position = str(row.number), f"best/{path.name}" if path else "", str(rank)
            search_acc = "" if pd.isna(row.search_val_acc) else f"{row.search_val_acc:.4f}"
            lines.append(f"| {position} | {name} | {_acc(row.val_acc_mean, row.val_acc_std, row.seeds)} | "
                         f"{search_acc} | {format_flops(row.flops)} | {row.params / 1e6:.3f}M | {config} |")
    else:
        lines.append("No candidate finished training.")
    base_row = frame[frame["role"] == "baseline"]
    if baseline is not None:
        acc = base_row["val_acc"].iloc[0] if len(base_row) and pd.notna(base_row["val_acc"].iloc[0]) else None
        state = base_row["state"].iloc[0] if len(base_row) else "not run"
        cost = format_flops(sum(baseline.flops_by_module().values()))
        lines += ["", f"Uniform DeiT-style baseline within the budget: width {baseline.embed_dim}, "
                      f"depth {baseline.depth}, heads {baseline.num_heads}, {cost} MACs; "
                      f"{scored} in the search: {f'{acc:.4f}' if acc is not None else state}."]
    again = ranking[ranking["retrained"]] if len(ranking) else ranking
    top, base = (again[again["role"] == r] for r in ("candidate", "baseline")) if len(again) else (again, again)
    if len(top) and len(base):
        best_row, base_row = top.iloc[0], base.iloc[0]
        diff = best_row["val_acc_mean"] - base_row["val_acc_mean"]
        lines += ["", f"Best searched candidate (trial {best_row['number']}) against the baseline, re-trained: "
                      f"{diff * 100:+.2f} points of validation accuracy (means over {best_row['seeds']} and "
                      f"{base_row['seeds']} seeds)."]
    return "\n".join(lines) + "\n"


def write_reports(run_dir: Path) -> None:
    """Rebuild every report in ``run_dir`` from its stored studies."""
    from ..spaces import Inputs, get_space

    settings = load_settings(run_dir)
    study = open_run_study(run_dir, settings)  # the study may live on a shared server
    runs = S.open_runs(study)
    frame = trial_table(study, runs)
    retrained = retrain_table(runs)
    ranking = final_ranking(frame, retrained, settings.objective)
    for name, table in (("trials.csv", frame), ("retrain.csv", retrained), ("ranking.csv", ranking)):
        tmp = run_dir / f".{name}.tmp"
        table.to_csv(tmp, index=False)
        tmp.replace(run_dir / name)
    best = export_best(study, settings.objective, settings.top, run_dir / "best")
    plot_pareto(frame, settings.budget, run_dir / "pareto.png", ranking)
    mosaic = run_dir / "mosaic.png" if write_mosaic(settings, study, frame, run_dir / "mosaic.png") else None
    configs = [t.user_attrs.get("config") for t in study.trials if t.user_attrs.get("config")]
    inputs = Inputs(settings.img_size, configs[0]["in_chans"], configs[0]["num_classes"]) if configs else Inputs(
        settings.img_size)
    # the baseline depends on the space's kind only (Space.baseline), not on a --parent or scorer weights, which
    # may have moved since the search
    baseline = get_space(settings.space).baseline(settings.budget, inputs)
    supernet = None
    if (run_dir / "supernet.pt").is_file():
        import torch

        state = torch.load(run_dir / "supernet.pt", map_location="cpu", weights_only=True, mmap=True)
        supernet = {"epochs": state.get("epochs"), "parent": state.get("parent")}
    summary = summary_markdown(settings, frame, ranking, best, baseline, supernet)
    write_html(study, frame, settings.objective, settings.budget,
               f"tokennas {settings.space} search under {settings.flops} MACs", run_dir / "report.html", mosaic,
               ranking, summary)
    _write(run_dir / "summary.md", summary)
