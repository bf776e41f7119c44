"""Throughput of ScheduleViT against timm's VisionTransformer, and what HVT's FLOPs cut buys in wall-clock.

The three models are warmed up, then timed in turn, one step each per round; a ratio is the median of the
per-round ratios (with its interquartile range), so that the load of a shared machine cancels. On the CPU the
default counts CPU time with one thread (``--clock cpu --threads 1``), which other processes cannot stretch;
``--clock wall --threads 2`` gives wall-clock throughput on a quiet machine.

    python benchmarks/bench_schedule_vit.py [--batch 4] [--rounds 40]       # CPU
    python benchmarks/bench_schedule_vit.py --batch 256 --rounds 30         # GPU (bf16, wall-clock)
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
    cuda = torch.cuda.is_available()
    parser.add_argument("--batch", type=int, default=256 if cuda else 4)
    parser.add_argument("--rounds", type=int, default=30 if cuda else 40, help="inference rounds; training: a quarter")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall" if cuda else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads() if cuda else 1)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = torch.randn(args.batch, 3, 224, 224, device=device)
    per = "img per CPU-second" if args.clock == "cpu" else "img/s"
    print(f"machine: {machine()}; batch {args.batch}; {'bf16 autocast' if device.type == 'cuda' else 'float32'}; "
          f"{args.clock} clock, {args.threads} thread(s); 2 warm-up steps each, then interleaved rounds")
    flops_ratio = tokennas.count_flops("deit_small") / tokennas.count_flops("hvt_s_1")
    for mode in ("inference", "training"):
        train = mode == "training"
        models = {"ours": tokennas.build_model("deit_small"), "timm": timm.create_model("deit_small_patch16_224"),
                  "hvt": tokennas.build_model("hvt_s_1")}
        rounds = max(5, args.rounds // 4) if train else args.rounds
        timings = interleaved({k: make_step(m, images, train) for k, m in models.items()}, rounds, clock=args.clock)
        rate = {k: timings.rate(k, args.batch) for k in models}
        print(f"{mode:9s}  tokennas deit_small {rate['ours']:6.1f} {per} | timm deit_small_patch16_224 "
              f"{rate['timm']:6.1f} {per} | ratio {format_ratio(timings.speed_ratio('ours', 'timm'), rounds)} "
              "(target >= 0.95)")
        hvt = timings.speed_ratio("hvt", "ours")
        print(f"{mode:9s}  hvt_s_1 {rate['hvt']:6.1f} {per}: {format_ratio(hvt, rounds)} deit_small's speed for "
              f"{flops_ratio:.2f}x fewer FLOPs ({100 * (hvt[0] - 1) / (flops_ratio - 1):.0f}% of the cut realised)")


if __name__ == "__main__":
    main()
