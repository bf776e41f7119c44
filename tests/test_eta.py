"""The live table's ETA: epochs left to the stage at the median epoch time, over the trials running side by side."""

from types import SimpleNamespace

from tokennas.search.tune.progress import LiveTable, eta_seconds, format_duration


def test_no_eta_before_the_first_epoch_is_timed():
    assert eta_seconds([{"state": "RUNNING", "planned": 3}], 4, 3, []) is None


def test_the_eta_counts_the_epochs_left_to_running_and_unstarted_trials():
    rows = [{"state": "COMPLETE", "planned": 3, "epoch": 3}, {"state": "RUNNING", "planned": 3, "epoch": 1},
            {"state": "RUNNING", "planned": 3, "epoch": 2}]
    # left: 2 + 1 epochs of the running trials, 2 trials not started x 3 epochs = 9 epochs at 10 s, two side by side
    assert eta_seconds(rows, 5, 3, [8.0, 10.0, 50.0]) == 9 * 10.0 / 2


def test_the_table_times_the_epochs_each_trial_reports(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("tokennas.search.tune.progress.time.monotonic", lambda: now[0])
    settings = SimpleNamespace(space="psvit", flops="30M", epochs=3)
    table = LiveTable(None, settings, remaining=2, enabled=False)
    trial = SimpleNamespace(trial_id="a", config={"number": 0, "flops": 1})
    table.on_trial_start(0, [], trial)
    for epoch, at in ((1, 112.0), (2, 124.0)):
        now[0] = at
        table.on_trial_result(0, [], trial, {"epoch": epoch, "val_acc": 0.5})
    assert table.epoch_seconds == [12.0, 12.0]
    # 1 epoch left to the running trial, 3 to the one not started: 4 x 12 s
    assert table.eta_text() == ", ETA 48s"
    assert "ETA 48s" in str(table.render().title)
    assert format_duration(48 * 60) == "48m" and format_duration(4 * 3600) == "4.0h"


def test_unstarted_trials_count_the_stages_own_epochs(monkeypatch):
    import optuna

    from tokennas.search.tune.searcher import RunsSearcher

    now = [0.0]
    monkeypatch.setattr("tokennas.search.tune.progress.time.monotonic", lambda: now[0])
    searcher = RunsSearcher(optuna.create_study(), [], max_epochs=6)  # re-ranking: 6 epochs a run, not the search's 3
    table = LiveTable(searcher, SimpleNamespace(space="psvit", flops="30M", epochs=3), remaining=2, enabled=False)
    trial = SimpleNamespace(trial_id="a", config={"number": 0, "flops": 1, "epochs": 6})
    table.on_trial_start(0, [], trial)
    now[0] = 10.0
    table.on_trial_result(0, [], trial, {"epoch": 1, "val_acc": 0.5})
    assert table.eta_text() == f", ETA {format_duration((5 + 6) * 10.0)}"  # 5 left to the running run, 6 to the next


def test_before_the_first_epoch_the_eta_comes_from_the_macs_at_the_measured_speed():
    from tokennas.models.schedule_vit import ScheduleViTConfig
    from tokennas.search.tune.progress import eta_from_macs
    from tokennas.speed import training_macs_per_second

    rows = [{"state": "RUNNING", "planned": 3, "epoch": 0, "flops": 10}, {"state": "PENDING", "planned": 3,
                                                                          "flops": 30}]
    # 3 epochs of 10 and 3 of 30 MACs, and 2 trials not started at 3 epochs of the mean, 20: 240 MACs
    assert eta_from_macs(rows, 4, 3, epoch_work=0.5) == 120.0
    config = ScheduleViTConfig(img_size=16, in_chans=1, num_classes=10, patch_size=4, embed_dim=32, depth=2,
                               num_heads=2)
    rate = training_macs_per_second(config, batch=2)
    assert 1e5 < rate < 1e14  # MACs per second of a real forward and backward, on any machine
    table = LiveTable(None, SimpleNamespace(space="psvit", flops="4G", epochs=3), remaining=4, enabled=False,
                      epoch_work=0.5)
    assert table.eta_text() == ""  # no trial yet and no budget: nothing to go by
    table.searcher = SimpleNamespace(budget=40, max_epochs=3)  # before a trial starts: each at most the budget
    assert table.eta_text() == ", ETA at most ~4m (from the budget, until a trial starts)"  # 4 x 3 x 40 x 0.5 s
    table.rows = {"a": rows[0], "b": rows[1]}
    assert table.eta_text() == ", ETA ~2m (from MACs, until an epoch is timed)"
    table.epoch_seconds = [10.0]  # a timed epoch replaces the estimate
    assert "~" not in table.eta_text()
