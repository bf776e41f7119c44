"""``summary.md``: what the run found, and what each figure rests on (split, epochs, seeds, read from the runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ..config import config_from_dict
from ..flops import format_flops


def _acc(mean, std, seeds) -> str:
    if seeds == 0 or pd.isna(mean):
        return ""
    return f"{mean:.4f} ± {0.0 if pd.isna(std) else std:.4f}"


def _stage_lines(settings, stages: dict[str, Any]) -> list[str]:
    """One line per stage, saying whether it ran completely; a stage never recorded is named as not run."""
    lines = []
    for stage, label in (("search", "search stage"), ("retrain", "re-ranking")):
        status = stages.get(stage)
        if status is None and stage == "retrain" and settings.retrain_top == 0:
            lines.append(f"- {label}: not asked for (--retrain-top 0)")
        elif status is None:
            lines.append(f"- {label}: INCOMPLETE: not run")
        elif status.get("asked") is False:
            lines.append(f"- {label}: {status['note']}")
        else:
            lines.append(f"- {label}: {'complete' if status['done'] else 'INCOMPLETE'}: {status['note']}")
    return lines


def _retrain_plan_line(settings, evaluated_start: str) -> list[str]:
    if settings.retrain_top == 0:
        return []
    return [f"- re-ranking asked for: the top {settings.retrain_top} and the baseline, {settings.retrain_seeds} "
            f"seeds each, {evaluated_start}; selection on the validation split only"]


def summary_markdown(settings, frame: pd.DataFrame, ranking: pd.DataFrame, best: list[Path],
                     baseline: dict[str, Any], strategy_lines: list[str], evaluated: str, retrain_epochs: int,
                     stages: dict[str, Any]) -> str:
    """The summary page; ``baseline`` is what the run recorded (``config`` or None, and a ``note``),
    ``strategy_lines`` the strategy's own description, ``evaluated`` its word for a candidate's search score."""
    candidates = frame[frame["role"] == "candidate"]
    counts = candidates["state"].value_counts().to_dict() if len(candidates) else {}
    lines = [f"# tokennas search: {settings.space} under {settings.flops} MACs", "",
             f"- objective: {settings.objective}, sampler: {settings.sampler}, scheduler: {settings.scheduler}, "
             f"seed: {settings.seed}",
             f"- data: {settings.dataset} at {settings.img_size}px, train subset: {settings.train_subset or 'all'}; "
             "every accuracy here is on the validation split carved from the training data (the test split is "
             "never read by a search)",
             f"- trials: {counts.get('COMPLETE', 0)} complete, {counts.get('PRUNED', 0)} stopped early, "
             f"{counts.get('FAIL', 0)} failed, {counts.get('INTERRUPTED', 0)} interrupted, "
             f"{counts.get('INFEASIBLE', 0)} proposals over budget and "
             f"{counts.get('REPEAT', 0)} repeated configs (neither {evaluated})",
             *strategy_lines,
             *_retrain_plan_line(settings, _n(retrain_epochs, "epoch")),
             *_stage_lines(settings, stages), ""]
    failed = candidates[candidates["state"] == "FAIL"]
    if len(failed):
        lines += [f"First failure: trial {failed.iloc[0]['number']}: {failed.iloc[0]['error']}", ""]
    if len(ranking):
        lines += ["| rank | trial | val_acc re-ranked (mean ± sd) | re-ranking runs | val_acc in search "
                  "| FLOPs | params | config |", "|---|---|---|---|---|---|---|---|"]
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
            search_acc = "" if pd.isna(row.search_val_acc) else \
                f"{row.search_val_acc:.4f} ({_epochs(row.search_epochs, evaluated)})"
            runs = f"{row.seeds} × {_n(int(row.retrain_epochs), 'epoch')} (seeds {row.seed_list})" if row.seeds else ""
            lines.append(f"| {position} | {name} | {_acc(row.val_acc_mean, row.val_acc_std, row.seeds)} | {runs} | "
                         f"{search_acc} | {format_flops(row.flops)} | {row.params / 1e6:.3f}M | {config} |")
    else:
        lines.append(f"No candidate was {evaluated} to the end.")
    lines += ["", _baseline_line(frame, baseline, evaluated)]
    again = ranking[ranking["retrained"]] if len(ranking) else ranking
    top, base = (again[again["role"] == r] for r in ("candidate", "baseline")) if len(again) else (again, again)
    if len(top) and len(base):
        best_row, base_row = top.iloc[0], base.iloc[0]
        diff = best_row["val_acc_mean"] - base_row["val_acc_mean"]
        lines += ["", f"Best searched candidate (trial {best_row['number']}) against the baseline, re-trained: "
                      f"{diff * 100:+.2f} points of validation accuracy (means over {best_row['seeds']} and "
                      f"{base_row['seeds']} runs of {_n(int(best_row['retrain_epochs']), 'epoch')})."]
    return "\n".join(lines) + "\n"


def _epochs(epochs, evaluated: str) -> str:
    if evaluated != "trained" or pd.isna(epochs):
        return evaluated
    return _n(int(epochs), "epoch")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def _baseline_line(frame: pd.DataFrame, baseline: dict[str, Any], evaluated: str) -> str:
    """The uniform reference: its shape and cost, and its search-stage outcome (the completed run, if any)."""
    if not baseline.get("config"):
        return f"Uniform DeiT-style baseline: {baseline.get('note') or 'none'}."
    config = config_from_dict(baseline["config"])
    runs = frame[frame["role"] == "baseline"]
    complete = runs[runs["state"] == "COMPLETE"]
    if len(complete):
        outcome = f"{complete['val_acc'].iloc[0]:.4f}"
    else:
        outcome = runs["state"].iloc[-1] if len(runs) else "not run"
    return (f"Uniform DeiT-style baseline within the budget: width {config.embed_dim}, depth {config.depth}, heads "
            f"{config.num_heads}, {format_flops(sum(config.flops_by_module().values()))} MACs; {evaluated} in the "
            f"search: {outcome}.")
