"""The run's tables, rebuilt from the stored studies: every trial, every re-ranking run, the final ranking."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from ..search.studies import study as S


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


LATENCY_COLUMN = "predicted_latency_ms_batch"  # + the batch size: trials.csv says what the latency figure is
MEASURED_COLUMN = "measured_latency_ms_batch"  # the same batch, timed after the search (the frozen strategy's speed)


def latency_column(frame: pd.DataFrame) -> str | None:
    """The predicted-latency column of a trial table (``predicted_latency_ms_batchN``), None when the run predicted
    no latency."""
    return next((c for c in frame.columns if c.startswith(LATENCY_COLUMN)), None)


def measured_column(frame: pd.DataFrame) -> str | None:
    """The measured-latency column of a trial table (``measured_latency_ms_batchN``), None when nothing was timed at
    the predicted latency's batch."""
    return next((c for c in frame.columns if c.startswith(MEASURED_COLUMN)), None)


def measured_ms(study: optuna.Study) -> dict[str, float]:
    """Milliseconds per forward at the latency model's batch, as the speed step measured them (median step), by
    name: ``trial N``, ``reference`` and ``parent``; empty when the run predicted no latency or timed nothing at
    that batch."""
    latency, speed = study.user_attrs.get("latency"), study.user_attrs.get("speed") or []
    if not latency:
        return {}
    batch = latency["batch"]
    rows = [row for row in speed if row["batch"] == batch]
    out = {row["name"]: 1e3 * batch / row["images_per_s"] for row in rows}
    if rows:  # the parent was timed beside each of them: its median over all their rounds
        out["parent"] = float(np.median([1e3 * batch / row["reference_images_per_s"] for row in rows]))
    return out


def cost_column(frame: pd.DataFrame, objective: str) -> str:
    """What a Pareto front trades accuracy against: ``flops``, or the predicted latency (``pareto-latency``)."""
    column = latency_column(frame) if objective == "pareto-latency" else "flops"
    if column is None:
        raise ValueError("a pareto-latency run's trial table has no predicted latency column")
    return column


def trial_table(study: optuna.Study, runs: optuna.Study | None = None) -> pd.DataFrame:
    """One row per trial of the search stage. ``state`` is Optuna's, except over-budget proposals
    (INFEASIBLE), proposals of an already trained config (REPEAT, ``repeat_of`` names it) and trials cut off
    before their last epoch (INTERRUPTED, asked again on ``--resume``). ``error`` says why a trial failed.
    ``fallback``: an untried feasible candidate handed to the sampler when it stalled, not its own proposal.
    ``moved``: the sampler picked a config already tried, and the nearest untried one (by the space's order) was
    proposed instead (``study.SkipTried``).
    The uniform baseline's reference run, when given ``runs``, is the row with ``role`` baseline. A run that
    predicted latency (``tokennas.latency``) has ``predicted_latency_ms_batchN``: milliseconds per forward of N
    images, as the model predicted them (the baseline is not predicted), and ``measured_latency_ms_batchN`` for the
    schedules the speed step timed at that batch (the baseline's reference too)."""
    latency = study.user_attrs.get("latency")
    predicted = f"{LATENCY_COLUMN}{latency['batch']}" if latency else None
    timed = measured_ms(study)
    measured = f"{MEASURED_COLUMN}{latency['batch']}" if timed else None
    rows = []
    for t in study.trials:
        rows.append({"number": t.number, "role": "candidate", "state": _state(t), "flops": t.user_attrs.get("flops"),
                     **({predicted: t.user_attrs.get("latency_ms")} if predicted else {}),
                     **({measured: timed.get(f"trial {t.number}")} if measured else {}),
                     "params": t.user_attrs.get("params"), "val_acc": t.user_attrs.get("val_acc"),
                     "epochs": t.user_attrs.get("epochs", 0), "seconds": _seconds(t),
                     "repeat_of": t.user_attrs.get("repeat_of"), "error": _reason(t), "node": t.user_attrs.get("node"),
                     "scored": _scored(t), "fallback": bool(t.user_attrs.get("fallback")),
                     "moved": bool(t.user_attrs.get("moved")), **{f"param_{k}": v for k, v in t.params.items()}})
    for t in _runs(runs, "search"):
        rows.append({"number": None, "role": "baseline", "state": _state(t), "flops": t.user_attrs.get("flops"),
                     **({measured: timed.get("reference")} if measured else {}),
                     "params": t.user_attrs.get("params"), "val_acc": t.user_attrs.get("val_acc"),
                     "epochs": len(t.user_attrs.get("history", [])), "seconds": _seconds(t), "repeat_of": None,
                     "error": _reason(t), "node": t.user_attrs.get("node"), "scored": _scored(t), "fallback": False,
                     "moved": False})
    columns = ["number", "role", "state", "flops", *([predicted] if predicted else []),
               *([measured] if measured else []), "params", "val_acc", "epochs",
               "seconds", "repeat_of", "error", "node", "scored", "fallback", "moved"]
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
    """One row per re-ranking run: which candidate (a trial number, or baseline), which seed, how many epochs were
    planned and trained, its outcome."""
    rows = [{"source": t.user_attrs.get("source"), "role": t.user_attrs.get("role"), "seed": t.user_attrs.get("seed"),
             "state": _state(t), "flops": t.user_attrs.get("flops"), "params": t.user_attrs.get("params"),
             "val_acc": t.user_attrs.get("val_acc"), "epochs_planned": t.user_attrs.get("epochs_planned"),
             "epochs": len(t.user_attrs.get("history", [])), "seconds": _seconds(t), "error": _reason(t),
             "node": t.user_attrs.get("node"), "start": "supernet weights" if t.user_attrs.get("init") else "scratch"}
            for t in _runs(runs, "retrain")]
    return pd.DataFrame(rows, columns=["source", "role", "seed", "state", "flops", "params", "val_acc",
                                       "epochs_planned", "epochs", "seconds", "error", "node", "start"])


def pareto_mask(frame: pd.DataFrame, acc: str = "val_acc", cost: str = "flops") -> pd.Series:
    """Non-dominated rows: no other row has at least the accuracy at no more cost (FLOPs, or the column ``cost``),
    and better in one."""
    accs, costs = frame[acc].to_numpy(dtype=float), frame[cost].to_numpy(dtype=float)
    return pd.Series([not ((accs >= a) & (costs <= f) & ((accs > a) | (costs < f))).any()
                      for a, f in zip(accs, costs, strict=True)], index=frame.index)


def ranked(frame: pd.DataFrame, objective: str) -> pd.DataFrame:
    """Feasible fully trained candidates, best first: by accuracy, or the Pareto front first in Pareto mode (against
    FLOPs, or against the predicted latency with ``pareto-latency``)."""
    done = frame[(frame["state"] == "COMPLETE") & (frame["role"] == "candidate")].copy()
    if done.empty:
        return done
    cost = cost_column(frame, objective)
    done["pareto"] = pareto_mask(done, cost=cost)
    if objective in S.PARETO_COSTS:
        return done.sort_values(["pareto", "val_acc", cost], ascending=[False, False, True])
    return done.sort_values(["val_acc", "flops"], ascending=[False, True])


def _seeds(values: pd.Series) -> str:
    return " ".join(str(int(v)) for v in sorted(values))


def final_ranking(frame: pd.DataFrame, retrained: pd.DataFrame, objective: str,
                  epochs: int | None = None) -> pd.DataFrame:
    """The search's candidates re-ranked by their mean validation accuracy over the re-ranking seeds.

    Only complete runs of ``epochs`` epochs count (the length the run's settings ask for; None: the longest
    present), so runs of different lengths are never averaged. Retrained candidates come first (by mean, or by the
    front of mean accuracy against FLOPs, or predicted latency, in Pareto mode, among candidates: the baseline is a
    reference, never part of the front; with no candidate re-ranked, the front of the search's scores); the rest
    follow in the search's order. Every row says what its figures rest on: the search's
    epochs, and the re-ranking runs' epochs, seed count and seeds, read from the runs themselves."""
    search = ranked(frame, objective)
    cost, latency = cost_column(frame, objective), latency_column(frame)
    done = retrained[retrained["state"] == "COMPLETE"]
    if epochs is None and len(done):
        epochs = int(done["epochs"].max())
    done = done[done["epochs"] == epochs]
    stats = done.groupby("source").agg(mean=("val_acc", "mean"), std=("val_acc", "std"), count=("val_acc", "size"),
                                       seed_list=("seed", _seeds))
    base_search = frame[(frame["role"] == "baseline") & (frame["state"] == "COMPLETE")]
    rows = []
    for row in search.itertuples():
        rows.append(_ranking_row("candidate", int(row.number), row, row.val_acc, row.epochs, stats, epochs, latency))
    if "baseline" in stats.index or len(base_search):
        base = done[done["source"] == "baseline"].iloc[0] if "baseline" in stats.index else base_search.iloc[0]
        acc, searched = (base_search["val_acc"].iloc[0], base_search["epochs"].iloc[0]) if len(base_search) \
            else (None, None)
        rows.append(_ranking_row("baseline", "baseline", base, acc, searched, stats, epochs, latency))
    columns = ["number", "role", "flops", *([latency] if latency else []), "params", "search_val_acc", "search_epochs",
               "val_acc_mean", "val_acc_std", "seeds", "seed_list", "retrain_epochs"]
    table = pd.DataFrame(rows, columns=columns)
    if table.empty:
        return table.assign(retrained=pd.Series(dtype=bool), score=pd.Series(dtype=float))
    table["number"] = table["number"].astype("Int64")
    table["retrained"] = table["seeds"] > 0
    table["score"] = table["val_acc_mean"].where(table["retrained"], table["search_val_acc"]).astype(float)
    if objective in S.PARETO_COSTS:
        table["pareto"] = False
        front = table["retrained"] & (table["role"] == "candidate")
        if not front.any():  # nothing re-ranked: the front of the search's own scores, the order ``ranked`` gives
            front = table["role"] == "candidate"
        if front.any():
            table.loc[front, "pareto"] = pareto_mask(table[front], "score", cost).astype(bool)
        keys, ascending = ["retrained", "pareto", "score", cost], [False, False, False, True]
    else:
        keys, ascending = ["retrained", "score", "flops"], [False, False, True]
    return table.sort_values(keys, ascending=ascending).reset_index(drop=True)


def _ranking_row(role: str, key, row, search_acc, search_epochs, stats: pd.DataFrame, epochs,
                 latency: str | None = None) -> dict:
    row_of = {"number": key if role == "candidate" else None, "role": role, "flops": row.flops,
              **({latency: getattr(row, latency, None)} if latency else {}),
              "params": row.params, "search_val_acc": search_acc, "search_epochs": search_epochs}
    if key not in stats.index:
        return {**row_of, "val_acc_mean": None, "val_acc_std": None, "seeds": 0, "seed_list": "",
                "retrain_epochs": None}
    have = stats.loc[key]
    return {**row_of, "val_acc_mean": have["mean"], "val_acc_std": have["std"], "seeds": int(have["count"]),
            "seed_list": have["seed_list"], "retrain_epochs": epochs}
