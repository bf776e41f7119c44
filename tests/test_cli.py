"""The command line as a user meets it: a real subprocess, real exit codes."""

import json
import subprocess
import sys

import pytest
import yaml

import tokennas
from tokennas.parents import list_parents


def run(*args):
    return subprocess.run([sys.executable, "-m", "tokennas.cli", *args], capture_output=True, text=True)


def test_flops_json():
    result = run("flops", "deit_small", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {"name", "family", "img_size", "flops", "params"}
    assert out["flops"] == tokennas.count_flops("deit_small") and out["params"] == 22050664


def test_flops_table_fvcore():
    result = run("flops", "hvt_s_1", "--method", "fvcore")
    assert result.returncode == 0, result.stderr
    assert "token_pools.0" in result.stdout and "blocks.11" in result.stdout


@pytest.mark.parametrize("args,needle", [
    (("flops", "nonexistent"), "nonexistent"),
    (("flops", "deit_small", "--method", "guess"), "guess"),
    (("flops",), "name"),
])
def test_bad_input_is_one_line_exit_2(args, needle):
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and needle in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_invalid_yaml_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("family: schedule_vit\nnum_heads: 5\n")
    result = run("flops", str(path))
    assert result.returncode == 2 and "num_heads" in result.stderr and result.stderr.count("\n") == 1


def test_presets_json():
    result = run("presets", "--json")
    rows = json.loads(result.stdout)
    assert {r["name"] for r in rows if r["kind"] == "preset"} == set(tokennas.list_presets())
    assert {r["name"] for r in rows if r["kind"] == "parent"} == set(list_parents())


TINY = {"family": "schedule_vit", "img_size": 32, "in_chans": 1, "num_classes": 10, "patch_size": 4, "embed_dim": 32,
        "depth": 2, "num_heads": 2}


def write_config(path, **changes):
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return str(path)


SHORT = ("--epochs", "1", "--train-subset", "200")  # a refusal that fails to come trains for seconds, not hours


def assert_one_line(result, code, *needles):
    assert result.returncode == code, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in result.stderr


@pytest.mark.parametrize("field,value", [("mlp_ratio", float("inf")), ("keep_tokens", [64, 32.5]),
                                         ("pool_after", [0.0])])
def test_non_finite_and_non_integer_fields_are_one_line(tmp_path, field, value):
    """inf, or a float where an integer belongs: refused naming the field, never counted (more in test_config)."""
    assert_one_line(run("flops", write_config(tmp_path / "c.yaml", **{field: value}), "--json"), 2, f"`{field}`")


@pytest.mark.parametrize("args,needle", [
    (("--batch-size", "0"), "--batch-size 0"),
    (("--lr", "0"), "--lr 0"),
    (("--lr", "nan"), "--lr nan"),
    (("--train-subset", "5"), "--train-subset 5"),
])
def test_train_refuses_bad_options_before_writing(tmp_path, args, needle):
    out = tmp_path / "out"
    assert_one_line(run("train", write_config(tmp_path / "c.yaml"), "--out", str(out), *SHORT, *args), 2, needle)
    assert not out.exists()


def test_a_diverging_training_exits_1_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = run("train", write_config(tmp_path / "c.yaml"), "--epochs", "1", "--train-subset", "200",
                 "--batch-size", "16", "--lr", "1e9", "--out", str(out))
    assert_one_line(result, 1, "loss is nan at epoch 1, step")
    assert not out.exists()


def test_train_never_replaces_an_earlier_run(tmp_path):
    config, out = write_config(tmp_path / "c.yaml"), tmp_path / "out"
    first = run("train", config, *SHORT, "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "history.csv", "metrics.json"]  # no temp left
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    second = run("train", config, *SHORT, "--seed", "1", "--out", str(out))
    assert_one_line(second, 2, repr(str(out)), "another --out")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("earlier", ["checkpoint.pt", "metrics.json", "history.csv"])
def test_train_refuses_a_folder_holding_any_earlier_output(tmp_path, earlier):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / earlier).write_bytes(b"earlier run")
    assert_one_line(run("train", write_config(tmp_path / "c.yaml"), "--out", str(tmp_path / "out"), *SHORT), 2,
                    earlier)
    assert (tmp_path / "out" / earlier).read_bytes() == b"earlier run"


def test_train_out_below_a_file_is_one_line(tmp_path):
    (tmp_path / "somefile.txt").write_text("not a folder")
    result = run("train", write_config(tmp_path / "c.yaml"), "--out", str(tmp_path / "somefile.txt" / "sub"), *SHORT)
    assert_one_line(result, 2, "somefile.txt", "is a file")
