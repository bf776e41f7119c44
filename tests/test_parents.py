"""Shipped parents: found by name under the package folder or $TOKENNAS_PARENTS_DIR, usable wherever a checkpoint is,
listed by `tokennas presets` with their test accuracy; a folder without checkpoint.pt is not built yet."""

import json
import os
from pathlib import Path

import pytest

from tokennas.cli import main
from tokennas.config import config_from_dict, save_config
from tokennas.models.supernet import load_parent, parent_trunk
from tokennas.parents import PARENTS_DIR, PARENTS_ENV, list_parents, parent_info, resolve_parent

TINY = {"family": "schedule_vit", "img_size": 12, "in_chans": 1, "num_classes": 10, "patch_size": 2, "embed_dim": 16,
        "depth": 2, "num_heads": 1}
TRAIN = ("--epochs", "2", "--train-subset", "3000")  # seconds on one core, yet clearly above chance (~0.2)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `tokennas ARGS`, run in this process through the real entry point."""
    with pytest.raises(SystemExit) as exit:
        main(list(args))
    out, err = capsys.readouterr()
    return exit.value.code, out, err


_built: dict[str, Path] = {}


def tiny_parent_root(tmp_path_factory) -> Path:
    """A parents root, built once per session: `tiny` (a ViT `tokennas train` trains in seconds, with config.yaml,
    command.txt, checkpoint.pt, metrics.json) and `unbuilt` (a config.yaml only). test_evaluate.py shares it."""
    if "root" not in _built:
        root = tmp_path_factory.mktemp("parents")
        config = save_config(config_from_dict(TINY), root / "tiny" / "config.yaml")
        command = ("train", str(config), "--out", str(root / "tiny"), *TRAIN)
        with pytest.raises(SystemExit) as exit:
            main(list(command))
        assert exit.value.code == 0
        (root / "tiny" / "command.txt").write_text(f"tokennas {' '.join(command)}\n")
        save_config(config_from_dict(TINY), root / "unbuilt" / "config.yaml")
        _built["root"] = root
    return _built["root"]


@pytest.fixture
def root(tmp_path_factory, monkeypatch) -> Path:
    root = tiny_parent_root(tmp_path_factory)
    monkeypatch.setenv(PARENTS_ENV, str(root))
    return root


def test_only_folders_with_a_checkpoint_are_listed(root):
    assert "tiny" in list_parents() and "unbuilt" not in list_parents()
    shipped = (PARENTS_DIR / "fmnist-vit" / "checkpoint.pt").is_file()
    assert ("fmnist-vit" in list_parents()) == shipped  # the package's own parent, once trained


def test_resolve_a_name_a_file_and_nothing(root):
    assert resolve_parent("tiny") == root / "tiny" / "checkpoint.pt"
    path = root / "tiny" / "checkpoint.pt"
    assert resolve_parent(str(path)) == path
    with pytest.raises(ValueError, match=r"^invalid --parent 'nosuch': neither a file nor a shipped parent "
                                         r"\(shipped: .*tiny.*\)$"):
        resolve_parent("nosuch")
    with pytest.raises(ValueError, match=r"^parent 'unbuilt' is not built yet: .*unbuilt' has no checkpoint\.pt"):
        resolve_parent("unbuilt")


def test_the_first_root_wins(root, tmp_path, monkeypatch):
    (tmp_path / "tiny").mkdir()  # an unbuilt `tiny` before the built one hides it
    monkeypatch.setenv(PARENTS_ENV, os.pathsep.join([str(tmp_path), str(root)]))
    assert "tiny" not in list_parents()
    with pytest.raises(ValueError, match="parent 'tiny' is not built yet"):
        resolve_parent("tiny")


def test_info_reads_the_folder(root):
    info = parent_info("tiny")
    metrics = json.loads((root / "tiny" / "metrics.json").read_text())
    assert info["config"] == config_from_dict(TINY) and info["path"] == root / "tiny" / "checkpoint.pt"
    assert info["test_acc"] == metrics["test_acc"] and 0.15 < info["test_acc"] <= 1  # trained, not chance
    assert info["command"].startswith("tokennas train ") and "--epochs 2" in info["command"]


def test_load_parent_and_parent_trunk_take_a_name(root):
    parent = load_parent("tiny", 12, 1, 10)
    assert parent.head_kept and parent.path == str(root / "tiny" / "checkpoint.pt")
    assert parent_trunk("tiny")["embed_dim"] == 16
    for read in (lambda name: load_parent(name, 12, 1, 10), parent_trunk):
        with pytest.raises(ValueError, match="invalid --parent 'nosuch': neither a file nor a shipped parent"):
            read("nosuch")


def test_presets_json_lists_the_parent_with_its_test_acc(root, capsys):
    code, out, _ = cli(capsys, "presets", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0
    metrics = json.loads((root / "tiny" / "metrics.json").read_text())
    tiny = rows["tiny"]
    assert tiny["kind"] == "parent" and tiny["test_acc"] == metrics["test_acc"]
    assert tiny["flops"] == metrics["flops"] and tiny["params"] == metrics["params"]
    assert "unbuilt" not in rows
    assert rows["deit_tiny"]["kind"] == "preset" and rows["deit_tiny"]["test_acc"] is None


def test_presets_table_shows_the_parent(root, capsys):
    code, out, _ = cli(capsys, "presets")
    acc = json.loads((root / "tiny" / "metrics.json").read_text())["test_acc"]
    assert code == 0 and "test acc" in out and "deit_tiny" in out
    assert any("tiny" in line and f"{acc:.4f}" in line for line in out.splitlines())


@pytest.mark.skipif(not (PARENTS_DIR / "fmnist-vit" / "checkpoint.pt").is_file(), reason="fmnist-vit is not built")
def test_the_shipped_parent_measures_what_it_records(capsys):
    """`tokennas evaluate fmnist-vit --split test` gives the test accuracy its metrics.json (and `tokennas presets`)
    state, on all 10,000 test images; the checkpoint records the validation split it was held out from (seed 0)."""
    import torch

    metrics = json.loads((PARENTS_DIR / "fmnist-vit" / "metrics.json").read_text())
    code, out, _ = cli(capsys, "evaluate", "fmnist-vit", "--split", "test", "--json")
    result = json.loads(out)
    assert code == 0 and result["images"] == 10000 and result["acc"] == pytest.approx(metrics["test_acc"], abs=2e-4)
    state = torch.load(PARENTS_DIR / "fmnist-vit" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["split"] == {"dataset": "fashion-mnist", "seed": 0, "val_fraction": 0.1}
