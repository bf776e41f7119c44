"""``summary.md``: what the run found, and what each figure rests on (split, epochs, seeds, read from the runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ..config import config_from_dict
from ..flops import format_flops
from .tables import latency_column


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
                     stages: dict[str, Any], extra: list[str] | None = None,
                     latency: dict[str, Any] | None = None) -> str:
    """The summary page; ``baseline`` is what the run recorded (``config`` or None, and a ``note``),
    ``strategy_lines`` the strategy's own description, ``evaluated`` its word for a candidate's search score,
    ``latency`` the latency model the run predicted with (``LatencyModel.record`` and the budget), if any."""
    candidates = frame[frame["role"] == "candidate"]
    counts = candidates["state"].value_counts().to_dict() if len(candidates) else {}
    under = f"{settings.flops} MACs" + (f" and {latency['budget_ms']:g} ms at batch {latency['batch']}"
                                        if latency and latency.get("budget_ms") else "")
    lines = [f"# tokennas search: {settings.space} under {under}", "",
             f"- objective: {_objective(settings.objective, latency)}, sampler: {settings.sampler}, scheduler: "
             f"{settings.scheduler}, seed: {settings.seed}"
             + ("" if settings.sampler_seed is None else f", sampler seed: {settings.sampler_seed}"),
             *_latency_lines(latency),
             f"- data: {settings.dataset} at {settings.img_size}px, train subset: {settings.train_subset or 'all'}; "
             "every accuracy here is on the validation split carved from the training data (the test split is "
             "never read by a search)",
             f"- trials: {counts.get('COMPLETE', 0)} complete, {counts.get('PRUNED', 0)} stopped early, "
             f"{counts.get('FAIL', 0)} failed, {counts.get('INTERRUPTED', 0)} interrupted, "
             f"{counts.get('INFEASIBLE', 0)} proposals over budget and "
             f"{counts.get('REPEAT', 0)} repeated configs (neither {evaluated}; a repeat is told its original's "
             f"outcome); {_fallbacks(candidates)} candidates drawn at random when the sampler stalled (fallbacks: an "
             "untried feasible config, or in a continuous space such as layers a uniform direction)"
             f"{_moved(candidates)}",
             *strategy_lines,
             *(_retrain_plan_line(settings, _n(retrain_epochs, "epoch")) if retrain_epochs else []),
             *_stage_lines(settings, stages), ""]
    failed = candidates[candidates["state"] == "FAIL"]
    if len(failed):
        lines += [f"First failure: trial {failed.iloc[0]['number']}: {failed.iloc[0]['error']}", ""]
    predicted = latency_column(ranking)
    if len(ranking):
        lines += ["| rank | trial | val_acc re-ranked (mean ± sd) | re-ranking runs | val_acc in search | FLOPs | "
                  + (f"predicted ms at batch {latency['batch']} | " if predicted else "") + "params | config |",
                  "|---|---|---|---|---|---|---|---|" + ("---|" if predicted else "")]
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
            ms = getattr(row, predicted) if predicted else None
            cost = f"{format_flops(row.flops)} | " + (f"{'' if pd.isna(ms) else f'{ms:.2f}'} | " if predicted else "")
            lines.append(f"| {position} | {name} | {_acc(row.val_acc_mean, row.val_acc_std, row.seeds)} | {runs} | "
                         f"{search_acc} | {cost}{row.params / 1e6:.3f}M | {config} |")
    else:
        lines.append(f"No candidate was {evaluated} to the end.")
    lines += ["", _baseline_line(frame, baseline, evaluated)]
    lines += _reference_line(frame, baseline, evaluated)
    lines += extra or []
    again = ranking[ranking["retrained"]] if len(ranking) else ranking
    top, base = (again[again["role"] == r] for r in ("candidate", "baseline")) if len(again) else (again, again)
    if len(top) and len(base):
        best_row, base_row = top.iloc[0], base.iloc[0]
        diff = best_row["val_acc_mean"] - base_row["val_acc_mean"]
        lines += ["", f"Best searched candidate (trial {best_row['number']}) against the baseline, re-trained: "
                      f"{diff * 100:+.2f} points of validation accuracy (means over {best_row['seeds']} and "
                      f"{base_row['seeds']} runs of {_n(int(best_row['retrain_epochs']), 'epoch')})."]
    return "\n".join(lines) + "\n"


def schedule_lines(speed: list[dict[str, Any]], configs: dict[str, dict[str, Any]], accs: dict[str, float],
                   evaluated: str, predicted: dict[str, float] | None = None, latency_batch: int | None = None,
                   measured: dict[str, float] | None = None) -> list[str]:
    """The exported schedules and the reference: patch tokens leaving each block, MACs, search accuracy, and their
    measured speed against the parent (median of paired ratios, interleaved), a schedule slower than the parent
    flagged. ``predicted``: the milliseconds the latency model predicted at ``latency_batch`` (by name), shown beside
    the ``measured`` ones (``tables.measured_ms``: the median step at that batch, when it was one of the timed
    batches)."""
    if not speed:
        return []
    table = pd.DataFrame(speed)
    latency = predicted is not None
    lines = ["", "Schedules against the parent (patch tokens leaving each block; inference speed measured here, "
             "interleaved with the parent, median of paired ratios; > 1x is faster):", "",
             "| schedule | patch tokens per block | MACs | val_acc " + f"({evaluated}) | "
             + (f"predicted ms at batch {latency_batch} (measured) | " if latency else "")
             + " | ".join(f"speed at batch {b}" for b in sorted(table["batch"].unique())) + " |",
             "|---|---|---|---|" + "---|" * (table["batch"].nunique() + latency)]
    for name, rows in table.groupby("name", sort=False):
        config = config_from_dict(configs[name])
        keep = list(getattr(config, "keep_tokens", ()) or ())
        tokens = " ".join(map(str, keep)) if keep else "all"
        cells = []
        for row in rows.sort_values("batch").itertuples():
            flag = " **SLOWER than the parent**" if row.speedup < 1 else ""
            cells.append(f"{row.speedup:.2f}x ({row.images_per_s:,.0f} img/s){flag}")
        acc = accs.get(name)
        if latency:
            timed = f" ({measured[name]:.2f})" if name in (measured or {}) else ""
            cells.insert(0, f"{predicted[name]:.2f}{timed}" if name in predicted else "")
        lines.append(f"| {name} | {tokens} | {format_flops(sum(config.flops_by_module().values()))} | "
                     f"{'' if acc is None else f'{acc:.4f}'} | " + " | ".join(cells) + " |")
    return lines


def _objective(objective: str, latency: dict[str, Any] | None) -> str:
    if objective == "pareto-latency" and latency:
        return f"pareto-latency (accuracy up, predicted ms per forward at batch {latency['batch']} down)"
    return objective


def _latency_lines(latency: dict[str, Any] | None) -> list[str]:
    """What the predicted latency rests on: the model's machine, clock and batch, the parent's measured ms."""
    if not latency:
        return []
    machine = latency["machine"]
    where = machine["gpu"] or f"{machine['cpu']}, {machine['cores']} cores, torch on {machine['threads']} thread(s)"
    origin = "read from its cache" if latency.get("cached") else f"measured in {latency['measure_seconds']:.0f} s"
    if latency.get("cache_file"):  # a model measured on a loaded machine stays until its file is deleted
        origin += f", cached in `{latency['cache_file']}` (delete it to measure again)"
    budget = f"; budget {latency['budget_ms']:g} ms" if latency.get("budget_ms") else ""
    return [f"- predicted latency: tokennas.latency's model of the parent's trunk at batch {latency['batch']} on "
            f"{where} ({latency['clock']} clock, torch {machine['torch']}; {origin}; the parent measured at "
            f"{latency['parent_ms']:.2f} ms){budget}"]


def _moved(candidates: pd.DataFrame) -> str:
    """The proposals the sampler made of a tried config that went to its nearest untried neighbour instead."""
    moved = int(candidates["moved"].astype(bool).sum()) if "moved" in candidates else 0
    return f"; {moved} proposals of a config already tried moved to the nearest untried one" if moved else ""


def _fallbacks(candidates: pd.DataFrame) -> int:
    """Fallback candidates the search asked for (an enqueued one still WAITING was never proposed)."""
    return int((candidates["fallback"].astype(bool) & (candidates["state"] != "WAITING")).sum())


def _epochs(epochs, evaluated: str) -> str:
    if evaluated != "trained" or pd.isna(epochs):
        return evaluated
    return _n(int(epochs), "epoch")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def _reference_line(frame: pd.DataFrame, baseline: dict[str, Any], evaluated: str) -> list[str]:
    """A space's own reference (``label``) against the best candidate at the search's fidelity, same images."""
    if not baseline.get("label"):
        return []
    runs = frame[(frame["role"] == "baseline") & (frame["state"] == "COMPLETE")]
    done = frame[(frame["role"] == "candidate") & (frame["state"] == "COMPLETE")]
    if not len(runs) or not len(done):
        return []
    best = done.sort_values(["val_acc", "flops"], ascending=[False, True]).iloc[0]
    diff = best["val_acc"] - runs["val_acc"].iloc[0]
    return ["", f"Best schedule (trial {best['number']}, {format_flops(best['flops'])} MACs) against the reference, "
                f"both {evaluated} on the same validation images: {best['val_acc']:.4f} against "
                f"{runs['val_acc'].iloc[0]:.4f} ({diff * 100:+.2f} points)."]


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
    macs = format_flops(sum(config.flops_by_module().values()))
    if baseline.get("label"):  # the space's own reference (the layers space: ToMe's constant r on the parent)
        return f"Reference within the budget: {baseline['label']}, {macs} MACs; {evaluated} in the search: {outcome}."
    return (f"Uniform DeiT-style baseline within the budget: width {config.embed_dim}, depth {config.depth}, heads "
            f"{config.num_heads}, {macs} MACs; {evaluated} in the search: {outcome}.")
