"""The Optuna side: samplers, the study in the run folder, and the one adapter for constraints.

Infeasible candidates are told to the study as finished trials with the worst objective values and
a positive ``flops`` constraint (Optuna 5's ``trial.set_constraint``), which TPE, NSGA-II and
``best_trials`` read. They are never trained. Only this module touches Optuna's constraint API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..config import ModelConfig

OBJECTIVES = ("acc", "pareto")
SAMPLERS = ("tpe", "nsga2", "random")
STUDY_NAME = "tokennas"


def make_sampler(name: str, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    """A seeded sampler; TPE and NSGA-II learn from the ``flops`` constraint."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                          n_startup_trials=max(2, min(10, trials // 3)))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, trials // 2)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"invalid --sampler {name!r}; expected one of: {', '.join(SAMPLERS)}")


def storage_url(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'study.db').resolve()}"


def open_study(where: Path | str | optuna.storages.BaseStorage, objective: str,
               sampler: optuna.samplers.BaseSampler | None = None, create: bool = False,
               study_name: str = STUDY_NAME) -> optuna.Study:
    """The study persisted in ``run_dir/study.db`` (``optuna-dashboard sqlite:///RUN_DIR/study.db``), or in
    the storage (URL or object, see ``storage.py``) given instead of a run folder. ``create`` joins a study
    of that name if another driver created it first."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["maximize"] if objective == "acc" else ["maximize", "minimize"]
    storage = storage_url(where) if isinstance(where, Path) else where
    if create:
        return optuna.create_study(storage=storage, study_name=study_name, sampler=sampler, directions=directions,
                                   load_if_exists=True)
    try:
        return optuna.load_study(storage=storage, study_name=study_name, sampler=sampler)
    except KeyError:
        raise ValueError(f"no study named {study_name!r} in its storage") from None


def record_cost(trial: optuna.Trial, config: ModelConfig, flops: int, budget: int) -> bool:
    """Store the candidate's costs and config on the trial; tell Optuna the constraint. True if feasible."""
    trial.set_user_attr("flops", flops)
    trial.set_user_attr("params", config.num_params())
    trial.set_user_attr("config", config.to_dict())
    trial.set_constraint("flops", float(flops - budget))
    return flops <= budget


def tell_infeasible(study: optuna.Study, trial: optuna.Trial, flops: int) -> None:
    """Close an over-budget proposal without training it: worst accuracy, its FLOPs, constraint > 0."""
    trial.set_user_attr("infeasible", True)
    study.tell(trial, 0.0 if len(study.directions) == 1 else [0.0, float(flops)])


def find_repeat(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial | None:
    """An earlier feasible trial with the same parameters, finished or still running."""
    for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)):
        if other.number != trial.number and other.params == trial.params and not is_repeat(other) \
                and not is_infeasible(other):
            return other
    return None


def tell_repeat(study: optuna.Study, trial: optuna.Trial, original: FrozenTrial) -> None:
    """Close a repeated proposal without training it: the original's outcome, or FAIL while it still runs."""
    trial.set_user_attr("repeat_of", original.number)
    if original.state == TrialState.COMPLETE:
        study.tell(trial, original.values)
    elif original.state == TrialState.PRUNED and len(study.directions) == 1 and original.intermediate_values:
        step = max(original.intermediate_values)
        trial.report(original.intermediate_values[step], step)
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)


def is_repeat(trial: FrozenTrial) -> bool:
    return "repeat_of" in trial.user_attrs


def is_infeasible(trial: FrozenTrial) -> bool:
    return any(v > 0 for v in (trial.constraints or {}).values()) or bool(trial.user_attrs.get("infeasible"))


def trained(trial: FrozenTrial) -> bool:
    """A feasible candidate that finished training or was stopped early by the scheduler."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and not is_infeasible(trial) \
        and not is_repeat(trial)


def tell_result(study: optuna.Study, trial: optuna.Trial, result: dict[str, Any] | None, max_epochs: int) -> None:
    """Close a trained trial: COMPLETE after all epochs, PRUNED if the scheduler stopped it, FAIL without a result."""
    if not result or "val_acc" not in result:
        study.tell(trial, state=TrialState.FAIL)
        return
    acc, epochs = float(result["val_acc"]), int(result["epoch"])
    trial.set_user_attr("val_acc", acc)
    trial.set_user_attr("epochs", epochs)
    trial.set_user_attr("seconds", float(result.get("time_total_s", 0.0)))
    if epochs < max_epochs:
        study.tell(trial, state=TrialState.PRUNED)
    elif len(study.directions) == 1:
        study.tell(trial, acc)
    else:
        study.tell(trial, [acc, float(trial.user_attrs["flops"])])


def report_epoch(study: optuna.Study, trial: optuna.Trial, acc: float, epoch: int, history: list[float]) -> None:
    """Intermediate accuracy: Optuna's ``report`` in single-objective mode, a user attribute in both."""
    history.append(acc)
    trial.set_user_attr("history", list(history))
    if len(study.directions) == 1:
        trial.report(acc, epoch)


def resume_interrupted(study: optuna.Study) -> int:
    """Trials left RUNNING by a killed search become FAIL, and their candidates are asked again."""
    stale = [t for t in study.trials if t.state == TrialState.RUNNING]
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        if not is_infeasible(t):
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return len(stale)
