"""`tokennas evaluate`: a config's accuracy on a parent's weights without training, its MACs and parameters; bad
input is one line on stderr and exit 2."""

import json

import pytest
import torch
from test_parents import TINY, cli, tiny_parent_root

from tokennas.config import build_model, config_from_dict, save_config
from tokennas.parents import PARENTS_ENV
from tokennas.train import save_checkpoint

MERGING = {**TINY, "keep_tokens": [24, 12]}  # ToMe merging of the tiny parent's 36 patch tokens: no new weights


@pytest.fixture
def root(tmp_path_factory, monkeypatch):
    root = tiny_parent_root(tmp_path_factory)
    monkeypatch.setenv(PARENTS_ENV, str(root))
    return root


def evaluate(capsys, *args: str) -> dict:
    code, out, err = cli(capsys, "evaluate", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def metrics(root) -> dict:
    return json.loads((root / "tiny" / "metrics.json").read_text())


def test_a_parent_by_name_scores_what_train_recorded(root, capsys):
    result = evaluate(capsys, "tiny", "--split", "test")
    recorded = metrics(root)
    assert set(result) == {"config", "parent", "acc", "loss", "flops", "params", "split", "images"}
    assert result["acc"] == recorded["test_acc"] and result["loss"] == pytest.approx(recorded["test_loss"])
    assert (result["flops"], result["params"]) == (recorded["flops"], recorded["params"])
    assert (result["config"], result["parent"], result["split"], result["images"]) == ("tiny", None, "test", 10000)


def test_a_checkpoint_path_and_the_uniform_config_on_the_parent_agree(root, capsys):
    recorded = metrics(root)["test_acc"]
    assert evaluate(capsys, str(root / "tiny" / "checkpoint.pt"), "--split", "test")["acc"] == recorded
    # the parent's own config run as a child of itself is the parent
    on_parent = evaluate(capsys, str(root / "tiny" / "config.yaml"), "--parent", "tiny", "--split", "test")
    assert on_parent["acc"] == recorded and on_parent["parent"] == "tiny"


def test_a_merging_schedule_on_the_parent_costs_fewer_macs(root, capsys, tmp_path):
    config = str(save_config(config_from_dict(MERGING), tmp_path / "merge.yaml"))
    by_name = evaluate(capsys, config, "--parent", "tiny", "--images", "2000")
    by_path = evaluate(capsys, config, "--parent", str(root / "tiny" / "checkpoint.pt"), "--images", "2000")
    assert by_name["flops"] < metrics(root)["flops"] and by_name["params"] == metrics(root)["params"]
    assert by_name["split"] == "val" and by_name["images"] == 2000 and 0.0 <= by_name["acc"] <= 1.0
    assert {k: v for k, v in by_path.items() if k != "parent"} == {k: v for k, v in by_name.items() if k != "parent"}


def test_the_table(root, capsys):
    code, out, _ = cli(capsys, "evaluate", "tiny", "--images", "300")
    assert code == 0 and "tokennas evaluate" in out and "tiny" in out and "300" in out


def test_a_parent_whose_classifier_does_not_fit_is_refused(root, capsys, tmp_path):
    five = config_from_dict({**TINY, "num_classes": 5})
    path = save_checkpoint(build_model(five), five, tmp_path / "five.pt")
    code, _, err = cli(capsys, "evaluate", str(root / "tiny" / "config.yaml"), "--parent", str(path))
    assert code == 2 and err.count("\n") == 1 and "five.pt" in err and "classifier does not fit" in err


@pytest.mark.parametrize("args,needles", [
    (("nosuch", "--parent", "tiny"), ("invalid CONFIG 'nosuch'", "preset name", "tiny")),
    (("deit_tiny",), ("'deit_tiny' needs --parent",)),
    (("{merge}",), ("needs --parent",)),
    (("{merge}", "--parent", "nosuch"), ("invalid --parent 'nosuch': neither a file nor a shipped parent",)),
    (("unbuilt",), ("parent 'unbuilt' is not built yet", "checkpoint.pt")),
    (("{merge}", "--parent", "unbuilt"), ("parent 'unbuilt' is not built yet",)),
    (("missing.yaml", "--parent", "tiny"), ("'missing.yaml' does not exist",)),
    (("tiny", "--split", "train"), ("invalid --split 'train'", "val or test")),
    (("tiny", "--images", "0"), ("invalid --images 0", "at least 1")),
    (("tiny", "--images", "99999"), ("invalid --images 99999", "at most 6000")),
    (("tiny", "--batch-size", "0"), ("invalid --batch-size 0",)),
    (("{wide}", "--parent", "tiny"), ("`embed_dim` is 32", "at most 16")),
    (("{state_dict}",), ("state_dict.pt", "without a config")),
    (("{merge}", "--parent", "{merge}"), ("merge.yaml", "not a PyTorch checkpoint")),
])
def test_bad_input_is_one_line_exit_2(root, capsys, tmp_path, args, needles):
    files = {"merge": save_config(config_from_dict(MERGING), tmp_path / "merge.yaml"),
             "wide": save_config(config_from_dict({**TINY, "embed_dim": 32}), tmp_path / "wide.yaml"),
             "state_dict": tmp_path / "state_dict.pt"}
    torch.save(build_model(config_from_dict(TINY)).state_dict(), files["state_dict"])
    code, out, err = cli(capsys, "evaluate", *(a.format(**files) for a in args))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(needle in err for needle in needles), err
    assert "Traceback" not in out + err
