"""Inference throughput of STT-S25 against Swin-B at 224px (Farooq et al. 2021, arXiv 2111.13156).

The paper reports STT-S25 at about twice Swin-B's throughput (on GPU). This prints images per second,
parameters and MACs for both, at random initialisation (no weights are needed to time a forward pass).

    .venv/bin/python benchmarks/bench_supertoken.py --batch 8 --iters 5
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

import tokennas.models.supertoken  # noqa: F401  (registers stt_s25)
from tokennas.config import build_model
from tokennas.flops import count_flops, format_flops

SWIN_B_MACS = 15.4e9  # Liu et al. 2021, Table 1


@torch.inference_mode()
def throughput(model: torch.nn.Module, batch: int, iters: int, warmup: int, device: str) -> float:
    """Images per second of ``model`` in eval mode on a random batch at 224px."""
    model = model.eval().to(device)
    images = torch.randn(batch, 3, 224, 224, device=device)
    for _ in range(warmup):
        model(images)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        model(images)
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {
        "stt_s25": (build_model("stt_s25"), count_flops("stt_s25")),
        "swin_base_patch4_window7_224": (timm.create_model("swin_base_patch4_window7_224", pretrained=False),
                                         SWIN_B_MACS),
    }
    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} iters={args.iters}")
    print("| model | params | MACs | img/s |")
    print("| --- | --- | --- | --- |")
    rates = {}
    for name, (model, macs) in models.items():
        rates[name] = throughput(model, args.batch, args.iters, args.warmup, args.device)
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {params / 1e6:.2f}M | {format_flops(macs)} | {rates[name]:.2f} |")
    print(f"stt_s25 / swin_b throughput: {rates['stt_s25'] / rates['swin_base_patch4_window7_224']:.2f}x")


if __name__ == "__main__":
    main()
