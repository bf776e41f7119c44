"""benchmarks/bench_layers.py end to end at toy sizes on a tiny trained parent: every subcommand runs and writes what
the next one reads."""

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

from tokennas.cli import main as tokennas_main

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bench_layers.py"
TRUNK = {"img_size": 16, "in_chans": 1, "num_classes": 10, "patch_size": 2, "embed_dim": 32, "depth": 4,
         "num_heads": 1}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_layers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_subcommand_on_a_tiny_parent(tmp_path, capsys):
    (tmp_path / "vit.yaml").write_text("family: schedule_vit\n" + "".join(f"{k}: {v}\n" for k, v in TRUNK.items()))
    with pytest.raises(SystemExit) as exit_:
        tokennas_main(["train", str(tmp_path / "vit.yaml"), "--epochs", "1", "--train-subset", "600", "--out",
                       str(tmp_path / "parent")])
    assert exit_.value.code == 0
    parent, bench = str(tmp_path / "parent" / "checkpoint.pt"), load_bench()
    capsys.readouterr()

    compare_csv = tmp_path / "compare.csv"
    bench.main(["compare", "--parent", parent, "--shares", "50", "--trials", "4", "--score-images", "100",
                "--finetune-epochs", "1", "--train-subset", "200", "--test-images", "500", "--runs",
                str(tmp_path / "runs"), "--out-csv", str(compare_csv)])
    out = capsys.readouterr().out
    assert "Parent test accuracy" in out and "CI above 0" in out and "after fine-tuning" in out
    frame = pd.read_csv(compare_csv, keep_default_na=False)
    frozen = frame[frame["stage"] == "frozen"]
    assert set(frozen["contender"]) == {"parent", "searched", "ToMe constant r", "EViT keep rate", "HVT pooling",
                                        "random (median)"}
    budget = int(frozen[frozen["contender"] == "searched"]["budget"].iloc[0])
    fits = frozen[(frozen["contender"] != "parent") & (frozen["config"] != "")]
    assert (fits["flops"].astype(int) <= budget).all()
    assert all(json.loads(c)["family"] == "schedule_vit" for c in fits["config"])
    assert set(frame[frame["stage"] == "finetuned1"]["contender"]) == {"searched", "ToMe constant r"}

    bench.main(["speed", "--parent", parent, "--from-csv", str(compare_csv), "--batches", "1", "4", "--rounds", "1",
                "--clock", "cpu", "--threads", "1"])
    assert "batch 1" in capsys.readouterr().out

    diff_csv, runs = tmp_path / "diff.csv", str(tmp_path / "runs")
    bench.main(["differentiable", "--parent", parent, "--shares", "50", "--score-images", "100", "--from-csv",
                str(compare_csv), "--compare-runs", runs, "--runs", runs, "--out-csv", str(diff_csv)])
    assert "differentiable - it (95% CI)" in capsys.readouterr().out
    learned = pd.read_csv(diff_csv)
    assert set(learned["contender"]) == {"differentiable", "frozen strategy's best", "ToMe constant r"}
    assert (learned["flops"] <= budget).all() and learned["test_acc"].between(0, 1).all()
    assert learned[learned["contender"] == "differentiable"]["wall_seconds"].iloc[0] > 0

    table = tmp_path / "gt.csv"
    for n in (6, 10):  # the second run resumes: only the 4 new rows are scored
        bench.main(["ground-truth", "--parent", parent, "--n", str(n), "--score-images", "100", "--out", str(table)])
    rows = pd.read_csv(table)
    assert sorted(rows["row"]) == list(range(10)) and rows["val_acc"].between(0, 1).all()

    bench.main(["replay", "--table", str(table), "--seeds", "1", "--evals", "8", "--live", f"{runs}/share50"])
    out = capsys.readouterr().out
    assert "NEAREST" in out and all(s in out for s in ("random", "tpe", "cmaes", "nsga2"))
    assert "Live searches" in out and "tpe, seed 0, live" in out
