"""Throughput of ScheduleViT against timm's VisionTransformer, and what HVT's FLOPs cut buys in wall-clock.

    python benchmarks/bench_schedule_vit.py [--batch 16] [--iters 5]      # CPU
    python benchmarks/bench_schedule_vit.py --batch 256 --iters 20        # GPU (bf16)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, throughput  # noqa: E402

import tokennas  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256 if torch.cuda.is_available() else 16)
    parser.add_argument("--iters", type=int, default=20 if torch.cuda.is_available() else 5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = torch.randn(args.batch, 3, 224, 224, device=device)
    print(f"machine: {machine()}; batch {args.batch}; {'bf16 autocast' if device.type == 'cuda' else 'float32'}")
    results = {}
    for mode in ("inference", "training"):
        train = mode == "training"
        ours = throughput(tokennas.build_model("deit_small"), images, train, args.iters)
        theirs = throughput(timm.create_model("deit_small_patch16_224"), images, train, args.iters)
        hvt = throughput(tokennas.build_model("hvt_s_1"), images, train, args.iters)
        results[mode] = (ours, theirs, hvt)
        print(f"{mode:9s}  tokennas deit_small {ours:8.1f} img/s | timm deit_small_patch16_224 {theirs:8.1f} img/s "
              f"| ratio {ours / theirs:.3f} (target >= 0.95)")
        flops_ratio = tokennas.count_flops("deit_small") / tokennas.count_flops("hvt_s_1")
        print(f"{mode:9s}  hvt_s_1 {hvt:8.1f} img/s: {hvt / ours:.2f}x deit_small's speed for "
              f"{flops_ratio:.2f}x fewer FLOPs ({100 * (hvt / ours - 1) / (flops_ratio - 1):.0f}% of the cut realised)")


if __name__ == "__main__":
    main()
