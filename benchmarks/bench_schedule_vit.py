"""Throughput of ScheduleViT against timm's VisionTransformer, and what HVT's FLOPs cut buys in wall-clock.

The three models are warmed up, then timed in turn, one step each per round; a ratio is the median of the
per-round ratios (with its interquartile range), so that the load of a shared machine cancels.

    python benchmarks/bench_schedule_vit.py [--batch 16] [--rounds 10]      # CPU
    python benchmarks/bench_schedule_vit.py --batch 256 --rounds 30         # GPU (bf16)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import format_ratio, interleaved, machine, make_step  # noqa: E402

import tokennas  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256 if torch.cuda.is_available() else 16)
    parser.add_argument("--rounds", type=int, default=30 if torch.cuda.is_available() else 10)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = torch.randn(args.batch, 3, 224, 224, device=device)
    print(f"machine: {machine()}; batch {args.batch}; {'bf16 autocast' if device.type == 'cuda' else 'float32'}; "
          f"2 warm-up steps each, then {args.rounds} interleaved rounds")
    flops_ratio = tokennas.count_flops("deit_small") / tokennas.count_flops("hvt_s_1")
    for mode in ("inference", "training"):
        train = mode == "training"
        models = {"ours": tokennas.build_model("deit_small"), "timm": timm.create_model("deit_small_patch16_224"),
                  "hvt": tokennas.build_model("hvt_s_1")}
        timings = interleaved({k: make_step(m, images, train) for k, m in models.items()}, args.rounds)
        rate = {k: timings.rate(k, args.batch) for k in models}
        print(f"{mode:9s}  tokennas deit_small {rate['ours']:6.1f} img/s | timm deit_small_patch16_224 "
              f"{rate['timm']:6.1f} img/s | ratio {format_ratio(timings.speed_ratio('ours', 'timm'), args.rounds)} "
              "(target >= 0.95)")
        hvt = timings.speed_ratio("hvt", "ours")
        print(f"{mode:9s}  hvt_s_1 {rate['hvt']:6.1f} img/s: {format_ratio(hvt, args.rounds)} deit_small's speed for "
              f"{flops_ratio:.2f}x fewer FLOPs ({100 * (hvt[0] - 1) / (flops_ratio - 1):.0f}% of the cut realised)")


if __name__ == "__main__":
    main()
