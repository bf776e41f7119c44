"""GPU readiness in one run: what a GPU-scale search relies on, measured in minutes (benchmarks/gpu_check.sh).

    python benchmarks/gpu_check.py [--smoke] [--out DIR]

Sections, each recorded in DIR/gpu_check.json and DIR/gpu_check.md (for RESULTS.md):
- ``throughput``: training images per second (bf16 autocast on a GPU) and model FLOPs utilisation of DeiT-S,
  HVT-S-1, three psvit candidates under 4G and one preset of each other family, against timm's
  ``deit_small_patch16_224``, interleaved (median of paired ratios);
- ``search``: ``tokennas search --space psvit --flops 4G`` on a generated 224px JPEG folder for 5 minutes with
  ``--gpus-per-trial 0.25``: candidates trained, their states, the exit status;
- ``scoring``: one-shot scoring speed (candidates per minute) on a psvit supernet and the peak GPU memory;
- ``oom``: a search whose batch does not fit in a trial's share of the GPU: the candidate FAILs with the reason and
  the search goes on.

``--smoke`` runs the same code at tiny sizes on the CPU (32px, a few images, seconds per section); the test suite
runs it so that the script cannot rot. MFU needs the GPU's peak bf16 FLOP/s (known for A100/H100/H200); on other
devices it is left out.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loader import make_folder  # noqa: E402
from common import machine, make_step  # noqa: E402

from tokennas import build_model, count_flops, load_config  # noqa: E402
from tokennas.data import load_data  # noqa: E402
from tokennas.flops import format_flops, parse_flops  # noqa: E402
from tokennas.models.supernet import build_supernet  # noqa: E402
from tokennas.search.strategies.oneshot import score, scoring_batches  # noqa: E402
from tokennas.spaces import get_space  # noqa: E402
from tokennas.spaces.base import Inputs  # noqa: E402
from tokennas.speed import interleaved  # noqa: E402

# dense bf16 tensor-core peaks (NVIDIA datasheets, SXM parts), FLOP/s
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}

FULL = dict(img=224, flops="4G", batch=128, rounds=5, per_class=300, val_per_class=50, classes=10,
            search_time="5m", search_epochs=2, search_batch=128, oom_time="90s", oom_batch=2048, score_images=2048,
            score_candidates=20, others=("crossvit_small", "quadformer_s_256_196", "stt_s25"))
SMOKE = dict(img=32, flops="30M", batch=4, rounds=2, per_class=12, val_per_class=4, classes=3,
             search_time=None, search_epochs=1, search_batch=8, oom_time=None, oom_batch=16, score_images=16,
             score_candidates=3, others=())


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def psvit_candidates(img: int, budget: str, k: int, in_chans: int = 3) -> list:
    """``k`` psvit candidates under the budget at ``img`` px: the cheapest, the median and the costliest."""
    space, inputs = get_space("psvit"), Inputs(img, in_chans, 10)
    feasible, _ = space.feasible(parse_flops(budget), inputs)
    configs = sorted((space.build(p, inputs) for p in feasible.values()), key=count_flops)
    picks = sorted({0, len(configs) // 2, len(configs) - 1})[:k]
    return [configs[i] for i in picks]


def models(size: dict) -> dict[str, tuple[torch.nn.Module, int, int]]:
    """Name -> (model, MACs per image, its resolution); the first is the reference, timm's own DeiT-S."""
    import timm

    img = size["img"]
    chosen: dict[str, tuple[torch.nn.Module, int, int]] = {}
    reference = timm.create_model("deit_small_patch16_224", pretrained=False, img_size=img, num_classes=10)
    deit = load_config("deit_small").replace(img_size=img, num_classes=10)
    chosen["timm deit_small_patch16_224"] = (reference, count_flops(deit), img)  # the same architecture as ours
    chosen["deit_small"] = (build_model(deit), count_flops(deit), img)
    if img == 224:
        named = ["hvt_s_1", *size["others"]]
        for name in named:
            config = load_config(name).replace(num_classes=10)
            chosen[name] = (build_model(config), count_flops(config), config.img_size)
    else:  # tiny: the cheapest candidate of each other space at this resolution
        for space in ("hvt", "crossvit", "quadtree", "stt"):
            s, inputs = get_space(space), Inputs(img, 3, 10)
            config = min((s.build(p, inputs) for p in list(s.grid(inputs))[:200]), key=count_flops)
            chosen[f"{space} (cheapest)"] = (build_model(config), count_flops(config), img)
    for i, config in enumerate(psvit_candidates(img, size["flops"], 3)):
        chosen[f"psvit {i + 1} ({format_flops(count_flops(config))})"] = (build_model(config), count_flops(config),
                                                                           img)
    return chosen


def throughput(size: dict) -> list[dict]:
    dev, batch = device(), size["batch"]
    chosen = models(size)
    images = {img: torch.randn(batch, 3, img, img, device=dev) for _, _, img in chosen.values()}
    # a training step: forward, cross-entropy, backward, AdamW (bf16 autocast on a GPU)
    steps = {name: make_step(model, images[img], train=True) for name, (model, _, img) in chosen.items()}
    timings = interleaved(steps, rounds=size["rounds"], warmup=1)
    reference = next(iter(chosen))
    peak, rows = peak_flops(), []
    for name, (_, macs, img) in chosen.items():
        rate = timings.rate(name, batch)
        speed, low, high = timings.speed_ratio(name, reference)
        achieved = 6 * macs * rate  # forward 2 FLOPs per MAC, backward twice the forward
        rows.append({"model": name, "img": img, "gmacs": round(macs / 1e9, 3), "images_per_s": round(rate, 1),
                     "vs_timm_deit_s": round(speed, 3), "iqr": [round(low, 3), round(high, 3)],
                     "mfu": round(achieved / peak, 3) if peak else None})
    return rows


def run_search(args: list[str], out: Path) -> tuple[int, float, pd.DataFrame | None, str]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "tokennas.cli", "search", *args, "--quiet", "--out", str(out)],
                            capture_output=True, text=True)
    seconds = time.monotonic() - started
    frame = pd.read_csv(out / "trials.csv") if (out / "trials.csv").is_file() else None
    return result.returncode, seconds, frame, (result.stderr.strip().splitlines() or [""])[-1]


def gpu_share() -> list[str]:
    return ["--gpus-per-trial", "0.25"] if torch.cuda.is_available() else ["--gpus-per-trial", "0"]


def bounds(size: dict, time_budget: str | None, smoke_trials: int) -> list[str]:
    """A GPU run is bounded by its time budget (--trials: every distinct candidate under the budget); the smoke run,
    on a CPU that may be busy, by a few trials."""
    if time_budget is None:
        return ["--trials", str(smoke_trials)]
    feasible, _ = get_space("psvit").feasible(parse_flops(size["flops"]), Inputs(size["img"], 3, size["classes"]))
    return ["--time-budget", time_budget, "--trials", str(len(feasible))]


def search(size: dict, folder: Path, out: Path) -> dict:
    code, seconds, frame, last = run_search(
        ["--space", "psvit", "--flops", size["flops"], "--dataset", "folder", "--data-dir", str(folder),
         "--img-size", str(size["img"]), *gpu_share(), *bounds(size, size["search_time"], 2),
         "--epochs", str(size["search_epochs"]), "--batch-size", str(size["search_batch"]),
         "--retrain-top", "0", "--max-failures", "1000", "--seed", "0"], out / "search")
    states = frame[frame["role"] == "candidate"]["state"].value_counts().to_dict() if frame is not None else {}
    return {"exit": code, "minutes": round(seconds / 60, 2), "states": states, "last_line": last,
            "trained_per_minute": round(states.get("COMPLETE", 0) / (seconds / 60), 2)}


def scoring(size: dict, folder: Path) -> dict:
    dev = device()
    data = load_data("folder", folder, size["img"])
    inputs = Inputs(size["img"], data.in_chans, data.num_classes)
    space = get_space("psvit")
    feasible, _ = space.feasible(parse_flops(size["flops"]), inputs)
    configs = [space.build(p, inputs) for p in feasible.values()]
    random.Random(0).shuffle(configs)
    net = build_supernet(configs).to(dev).eval()
    batches = scoring_batches(data, size["score_images"], size["img"], dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    score(net, configs[0], batches)  # warm-up
    started = time.perf_counter()
    for config in configs[: size["score_candidates"]]:
        score(net, config, batches)
    seconds = time.perf_counter() - started
    return {"candidates": size["score_candidates"], "images_each": min(size["score_images"], len(data.val)),
            "candidates_per_minute": round(size["score_candidates"] / seconds * 60, 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None}


def oom(size: dict, folder: Path, out: Path) -> dict:
    code, seconds, frame, last = run_search(
        ["--space", "psvit", "--flops", size["flops"], "--dataset", "folder", "--data-dir", str(folder),
         "--img-size", str(size["img"]), *gpu_share(), *bounds(size, size["oom_time"], 1), "--epochs", "1",
         "--batch-size", str(size["oom_batch"]), "--retrain-top", "0", "--max-failures", "1000", "--seed", "1"],
        out / "oom")
    candidates = frame[frame["role"] == "candidate"] if frame is not None else pd.DataFrame(columns=["state"])
    errors = candidates["error"].astype("string").fillna("") if "error" in candidates else pd.Series(dtype="string")
    oom_rows = candidates[errors.str.contains("out of memory", case=False)]
    after = candidates[candidates["number"] > oom_rows["number"].min()] if len(oom_rows) else candidates.iloc[0:0]
    return {"exit": code, "minutes": round(seconds / 60, 2), "out_of_memory_fails": len(oom_rows),
            "all_oom_rows_fail": bool((oom_rows["state"] == "FAIL").all()) if len(oom_rows) else None,
            "trials_after_first_oom": len(after), "first_reason": oom_rows["error"].iloc[0] if len(oom_rows) else None,
            "states": candidates["state"].value_counts().to_dict(), "last_line": last}


def markdown(report: dict) -> str:
    lines = [f"### GPU check ({report['device']}, {report['date']}{', smoke' if report['smoke'] else ''})", "",
             "| model | px | GMACs | training images/s (bf16 on a GPU) | vs timm DeiT-S | MFU |",
             "|---|---|---|---|---|---|"]
    for r in report["throughput"]:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['model']} | {r['img']} | {r['gmacs']} | {r['images_per_s']} | {r['vs_timm_deit_s']}x | "
                     f"{mfu} |")
    s, c, o = report["search"], report["scoring"], report["oom"]
    lines += ["", f"- search ({report['size']['flops']}, {report['size']['img']}px folder, {s['minutes']} min, "
              f"exit {s['exit']}): candidate states {s['states']}, {s['trained_per_minute']} trained per minute",
              f"- one-shot scoring: {c['candidates_per_minute']} candidates per minute on {c['images_each']} images, "
              f"peak memory {c['peak_memory_gib']} GiB",
              f"- out of memory: {o['out_of_memory_fails']} candidates FAILed with it"
              f"{' (NOT PROVOKED: the check did not happen)' if o['out_of_memory_fails'] == 0 else ''} "
              f"({o['first_reason']!r}); {o['trials_after_first_oom']} trials ran after the first; states "
              f"{o['states']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the test suite's run)")
    parser.add_argument("--out", type=Path, default=Path("results/gpu-check"))
    args = parser.parse_args(argv)
    size = SMOKE if args.smoke else FULL
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {str(args.out)!r} already holds files; use another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    # bench_loader.py's noisy JPEGs: throughput, memory and failure checks need nothing learnable
    folder = make_folder(args.out / "folder", size["per_class"] * size["classes"], size["img"], size["val_per_class"],
                         size["classes"])
    report = {"device": machine() if torch.cuda.is_available() else "CPU", "machine": machine(),
              "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke, "size": size}
    for section, run in (("throughput", lambda: throughput(size)), ("scoring", lambda: scoring(size, folder)),
                         ("search", lambda: search(size, folder, args.out)),
                         ("oom", lambda: oom(size, folder, args.out))):
        started = time.monotonic()
        report[section] = run()
        print(f"{section}: done in {time.monotonic() - started:.0f}s", flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
