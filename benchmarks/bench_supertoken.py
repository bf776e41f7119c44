"""Inference throughput of STT-S25 against Swin-B at 224px (Farooq et al. 2021, arXiv 2111.13156).

The paper reports STT-S25 at about twice Swin-B's throughput (on GPU). This prints images per second,
parameters and MACs for both, at random initialisation (no weights are needed to time a forward pass). The two
are warmed up, then timed in turn (``common.interleaved``); the ratio is the median of the per-round ratios.

    .venv/bin/python benchmarks/bench_supertoken.py --batch 8 --rounds 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import format_ratio, interleaved, make_step  # noqa: E402

import tokennas.models.supertoken  # noqa: E402, F401  (registers stt_s25)
from tokennas.config import build_model  # noqa: E402
from tokennas.flops import count_flops, format_flops  # noqa: E402

SWIN_B_MACS = 15.4e9  # Liu et al. 2021, Table 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {
        "stt_s25": (build_model("stt_s25"), count_flops("stt_s25")),
        "swin_base_patch4_window7_224": (timm.create_model("swin_base_patch4_window7_224", pretrained=False),
                                         SWIN_B_MACS),
    }
    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} rounds={args.rounds}")
    print("| model | params | MACs | img/s |")
    print("| --- | --- | --- | --- |")
    images = torch.randn(args.batch, 3, 224, 224, device=args.device)
    timings = interleaved({name: make_step(model, images, train=False) for name, (model, _) in models.items()},
                          args.rounds, args.warmup)
    for name, (model, macs) in models.items():
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {params / 1e6:.2f}M | {format_flops(macs)} | {timings.rate(name, args.batch):.2f} |")
    ratio = timings.speed_ratio("stt_s25", "swin_base_patch4_window7_224")
    print(f"stt_s25 / swin_b throughput: {format_ratio(ratio, args.rounds)}")

if __name__ == "__main__":
    main()
