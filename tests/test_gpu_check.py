"""benchmarks/gpu_check.sh --smoke: the GPU readiness script's own code, at tiny sizes on the CPU, so that it cannot
rot between the rare runs on a GPU machine."""

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_runs_every_section(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["smoke"] and report["device"] == "CPU"
    rows = {r["model"]: r for r in report["throughput"]}
    assert rows["timm deit_small_patch16_224"]["vs_timm_deit_s"] == 1.0
    assert {"deit_small", "hvt (cheapest)", "crossvit (cheapest)", "quadtree (cheapest)", "stt (cheapest)"} <= set(rows)
    assert sum(name.startswith("psvit ") for name in rows) == 3
    assert all(r["images_per_s"] > 0 and r["mfu"] is None for r in rows.values())  # no peak FLOP/s for a CPU
    # the same architecture in timm and in tokennas: the same MACs
    assert rows["deit_small"]["gmacs"] == rows["timm deit_small_patch16_224"]["gmacs"]
    assert report["scoring"]["candidates_per_minute"] > 0
    search = report["search"]
    assert search["exit"] == 0 and search["states"]["COMPLETE"] == 2, search  # the smoke run: 2 trials
    assert report["oom"]["states"]["COMPLETE"] == 1 and report["oom"]["out_of_memory_fails"] == 0  # no OOM on a CPU
    markdown = (out / "gpu_check.md").read_text()
    assert markdown.startswith("### GPU check (CPU, ") and "| psvit 1 " in markdown
