import os

import pytest
import torch

from tokennas.cli import main

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny ops run several times faster (above all on a shared 2-core machine),
    and timings count no thread waiting for another."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# the 4-block ViT at 16px (64 patch tokens) that the layers, latency and differentiable tests search on
TINY_TRUNK = {"img_size": 16, "in_chans": 1, "num_classes": 10, "patch_size": 2, "embed_dim": 32, "depth": 4,
              "num_heads": 1}


def train_tiny_parent(folder, trunk: dict):
    """``trunk`` trained for one epoch on 600 Fashion-MNIST images in ``folder`` (seconds): its checkpoint.pt."""
    (folder / "vit.yaml").write_text("family: schedule_vit\n" + "".join(f"{k}: {v}\n" for k, v in trunk.items()))
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(folder / "vit.yaml"), "--epochs", "1", "--train-subset", "600", "--out",
              str(folder / "run")])
    assert exit_.value.code == 0
    return folder / "run" / "checkpoint.pt"


@pytest.fixture(scope="session")
def tiny_parent(tmp_path_factory):
    """``TINY_TRUNK`` trained once for the whole session."""
    return train_tiny_parent(tmp_path_factory.mktemp("parent"), TINY_TRUNK)
