"""Training that can fail: a short run must clearly beat chance, and a diverging one must stop at once."""

import pytest
import torch

from tokennas.data import load_data
from tokennas.models.schedule_vit import ScheduleViTConfig
from tokennas.train import NonFiniteLoss, TrainSettings, fit

SMALL = ScheduleViTConfig(img_size=32, in_chans=1, num_classes=10, patch_size=4, embed_dim=64, num_heads=2, depth=3)


@pytest.fixture(scope="module")
def data():
    return load_data(train_subset=2000, seed=0)


def test_short_training_clearly_beats_chance(data):
    """Chance is 0.10 on Fashion-MNIST's ten balanced classes. This tiny ViT measured 0.29 here after 2 epochs
    on 2000 images (62 steps); a broken recipe, label shuffle or augmentation stays at chance, so 0.2 is
    twice chance with room for seed noise."""
    history = []
    fit(SMALL, data, TrainSettings(epochs=2, device="cpu"), lambda metrics, state: history.append(metrics))
    assert history[-1]["val_acc"] > 0.2
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_a_diverging_loss_stops_at_once_and_names_the_step(data):
    seen = []
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at epoch 1, step (\d+)") as err:
        fit(SMALL, data, TrainSettings(epochs=2, lr=1e6, device="cpu"), lambda metrics, state: seen.append(metrics))
    assert not seen  # no epoch was reported as a result
    step = int(err.value.args[0].rsplit(" ", 1)[1])
    assert 1 < step < 2000 // 64


def test_resume_continues_from_a_checkpoint(data):
    states = []
    torch.manual_seed(0)
    fit(SMALL, data, TrainSettings(epochs=2, device="cpu"), lambda metrics, state: states.append(state))
    model, metrics = fit(SMALL, data, TrainSettings(epochs=2, device="cpu"), resume=states[0])
    assert metrics["epoch"] == 2


def test_tokennas_train_resumes_a_killed_run_from_its_last_epoch(tmp_path):
    """`tokennas train` keeps its state after every epoch (last.pt); a run killed after its first epoch goes on with
    --resume, keeps the epochs it had, and ends whole (checkpoint.pt, metrics.json, last.pt removed)."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import pandas as pd

    (tmp_path / "vit.yaml").write_text("family: schedule_vit\nimg_size: 12\nin_chans: 1\nnum_classes: 10\n"
                                       "patch_size: 2\nembed_dim: 16\ndepth: 2\nnum_heads: 1\n")
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "tokennas.cli", "train", str(tmp_path / "vit.yaml"), "--epochs", "4",
            "--train-subset", "1000", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / "last.pt").exists() and not (out / "checkpoint.pt").exists()
    first = torch.load(out / "last.pt", weights_only=True)["history"]
    assert 1 <= len(first) < 4

    refused = subprocess.run(argv, env=env, capture_output=True, text=True)  # no --resume: the run is not replaced
    assert refused.returncode == 2 and "holds an unfinished run" in refused.stderr
    longer = [a if a != "4" else "5" for a in argv]  # --epochs 5: another learning-rate schedule
    other = subprocess.run([*longer, "--resume"], env=env, capture_output=True, text=True)
    assert other.returncode == 2 and "--epochs 5" in other.stderr and "--epochs 4" in other.stderr
    done = subprocess.run([*argv, "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    assert history["val_acc"].tolist()[: len(first)] == [h["val_acc"] for h in first]  # kept, not retrained
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 4 and not (out / "last.pt").exists()


def test_tokennas_train_init_starts_from_a_checkpoints_weights(tmp_path, capsys):
    """--init: a second schedule from a trained checkpoint. At a learning rate too small to move the weights, the
    run ends where the checkpoint was (a fresh initialisation at that rate does not); another config's checkpoint is
    refused."""
    import json

    from tokennas.cli import main

    def train(*argv):
        with pytest.raises(SystemExit) as exit_:
            main(["train", *argv])
        return exit_.value.code

    (tmp_path / "vit.yaml").write_text("family: schedule_vit\nimg_size: 12\nin_chans: 1\nnum_classes: 10\n"
                                       "patch_size: 2\nembed_dim: 16\ndepth: 2\nnum_heads: 1\n")
    short = ["--epochs", "1", "--train-subset", "1000"]
    assert train(str(tmp_path / "vit.yaml"), *short, "--out", str(tmp_path / "a")) == 0
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())["test_acc"]
    assert train(str(tmp_path / "vit.yaml"), *short, "--lr", "1e-12", "--init", str(tmp_path / "a" / "checkpoint.pt"),
                 "--out", str(tmp_path / "b")) == 0
    assert train(str(tmp_path / "vit.yaml"), *short, "--lr", "1e-12", "--out", str(tmp_path / "fresh")) == 0
    resumed = json.loads((tmp_path / "b" / "metrics.json").read_text())["test_acc"]
    fresh = json.loads((tmp_path / "fresh" / "metrics.json").read_text())["test_acc"]
    # (timm's warm-up starts at 1e-5 whatever the --lr, so the weights move a hair: a few of 10,000 images flip)
    assert abs(resumed - first) <= 0.003 and abs(fresh - first) > 0.03
    (tmp_path / "wide.yaml").write_text((tmp_path / "vit.yaml").read_text().replace("embed_dim: 16", "embed_dim: 32"))
    capsys.readouterr()
    assert train(str(tmp_path / "wide.yaml"), *short, "--init", str(tmp_path / "a" / "checkpoint.pt"), "--out",
                 str(tmp_path / "c")) == 2
    err = capsys.readouterr().err
    assert "invalid --init" in err and "another config" in err and not (tmp_path / "c").exists()
