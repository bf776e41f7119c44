"""Real Ray Tune runs on the CPU that exercise what short searches never reach: a trial that raises,
early stopping at a rung, a deadline that cuts a trial, and Pareto-mode rungs that keep cheap models."""

import contextlib
from typing import Any

import optuna
import pandas as pd
import pytest

from tokennas.models.schedule_vit import ScheduleViTConfig
from tokennas.report.tables import pareto_mask
from tokennas.search.run import SearchFailed, run_search
from tokennas.search.settings import SearchSettings
from tokennas.search.studies import study as S
from tokennas.spaces import Inputs, Space, register_space


class ChannelsSpace(Space):
    """A space where half of the candidates cannot train: three input channels against a one-channel dataset.
    Building them is fine; training raises inside the Ray trial, as a real bug in a candidate would."""

    name = "test-channels"
    description = "test only"

    def dimensions(self, inputs: Inputs) -> dict[str, tuple[Any, ...]]:
        return {"embed_dim": (32, 48, 64, 96), "in_chans": (3, 1)}

    def build(self, params: dict[str, Any], inputs: Inputs) -> ScheduleViTConfig:
        return ScheduleViTConfig(img_size=inputs.img_size, in_chans=params["in_chans"], num_classes=inputs.num_classes,
                                 patch_size=8, embed_dim=params["embed_dim"], num_heads=2, depth=2)


def settings(**changes) -> SearchSettings:
    base = dict(space="psvit", flops="30M", trials=2, epochs=2, train_subset=300, seed=0, retrain_top=0,
                cpus_per_trial=2.0, sampler="random")
    return SearchSettings(**{**base, **changes})


def table(run_dir) -> pd.DataFrame:
    frame = pd.read_csv(run_dir / "trials.csv")
    return frame[frame["role"] == "candidate"]


def test_a_trial_that_raises_is_fail_with_its_error_and_the_search_goes_on(tmp_path):
    register_space(ChannelsSpace())
    run_dir = run_search(settings(space="test-channels", flops="10M", trials=3, max_failures=10, epochs=1),
                         out=tmp_path / "run", progress=False)
    frame = table(run_dir)
    failed = frame[frame["state"] == "FAIL"]
    assert len(frame[frame["state"] == "COMPLETE"]) == 3  # failures do not count towards --trials
    assert len(failed) >= 1
    assert failed["error"].str.contains("ValueError: config `in_chans` is 3 but dataset 'fashion-mnist' has 1").all()
    assert (failed["param_in_chans"] == 3).all() and (frame[frame["state"] == "COMPLETE"]["param_in_chans"] == 1).all()


@pytest.mark.slow  # about 40 s: a real Ray search
def test_asha_stops_a_weak_candidate_after_the_warmup(tmp_path):
    run_dir = run_search(settings(trials=5, epochs=3, scheduler="asha"), out=tmp_path / "run", progress=False)
    frame = table(run_dir)
    stopped = frame[frame["state"] == "PRUNED"]
    assert len(stopped) >= 1 and (stopped["epochs"] < 3).all() and (stopped["epochs"] >= 1).all()
    assert len(frame[frame["state"] == "COMPLETE"]) + len(stopped) == 5
    assert (pd.read_csv(run_dir / "trials.csv").query("role == 'baseline'")["epochs"] == 3).all()  # never stopped


@pytest.mark.slow  # about 40 s: a real Ray search
def test_pareto_rungs_keep_the_cheapest_candidate_on_the_front(tmp_path):
    run_dir = run_search(settings(trials=5, epochs=3, objective="pareto", scheduler="asha"), out=tmp_path / "run",
                         progress=False)
    frame = table(run_dir)
    trained = frame[frame["state"].isin(["COMPLETE", "PRUNED"])]
    cheapest = trained.loc[trained["flops"].idxmin()]
    assert cheapest["state"] == "COMPLETE"  # plain ASHA would judge it on accuracy alone
    complete = frame[frame["state"] == "COMPLETE"]
    assert pareto_mask(complete).loc[cheapest.name]


@pytest.mark.slow  # about 4 minutes: a search cut by its deadline, then resumed
def test_a_deadline_cuts_a_trial_and_resume_trains_it_again(tmp_path):
    run_dir = tmp_path / "run"
    with contextlib.suppress(SearchFailed):  # when the deadline cut every candidate, nothing was trained: exit 1
        run_search(settings(trials=2, epochs=6, train_subset=3000, time_budget="25s", scheduler="fifo",
                            cpus_per_trial=1.0), out=run_dir, progress=False)
    frame = table(run_dir)
    cut = frame[frame["state"] == "INTERRUPTED"]
    assert len(cut) >= 1 and cut["error"].str.contains("cut by --time-budget after epoch").all()
    assert len(frame[frame["state"] == "COMPLETE"]) < 2  # a cut trial does not count as trained
    run_search(None, resume=run_dir, progress=False, overrides={"time_budget": None})
    study = optuna.load_study(storage=f"sqlite:///{run_dir / 'study.db'}", study_name="tokennas")
    retried = {t.user_attrs["retry_of"] for t in study.trials if "retry_of" in t.user_attrs}
    assert set(cut["number"]) <= retried
    assert sum(S.trained(t) for t in study.trials) == 2


@pytest.fixture(autouse=True)
def _unregister():
    yield
    from tokennas.spaces import SPACES

    SPACES.pop("test-channels", None)
