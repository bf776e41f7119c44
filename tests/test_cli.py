"""The command line as a user meets it: a real subprocess, real exit codes."""

import json
import subprocess
import sys

import pytest

import tokennas


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
    assert {r["name"] for r in rows} == set(tokennas.list_presets())
