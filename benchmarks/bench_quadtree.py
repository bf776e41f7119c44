"""Quadtree tokenizer throughput and its share of a Quadformer training step (Ronen et al. 2023, arXiv 2304.00287).

For each setting (224px with a 100-token budget; 32px Fashion-MNIST, the search default) and each scorer, prints
the tokenizer's images per second and its share of one training step (forward, backward, AdamW) of the paired
ViT-S-size Quadformer at the same batch size. The step is timed once per setting with the pixel-blur scorer; for
the other scorers the step time is that step with the tokenizer time swapped. The feature scorer runs with random
lcnet_050 weights saved to a temporary file (its cost does not depend on the weights).

    .venv/bin/python benchmarks/bench_quadtree.py [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import timm
import torch

from tokennas.config import build_model
from tokennas.flops import count_flops, format_flops
from tokennas.models.quadformer import QuadformerConfig
from tokennas.models.quadtree import tokenizer_from_config

SMALL = dict(embed_dim=384, depth=12, num_heads=6)  # ViT-S
SETTINGS = {  # name -> (geometry, batch)
    "224px, 100 tokens, 14-56px patches": (dict(img_size=224, in_chans=3, num_classes=1000, patch_size=14,
                                                min_patch_size=14, max_patch_size=56, budget=100), 16),
    "32px Fashion-MNIST, 40 tokens, 4-16px patches": (dict(img_size=32, in_chans=1, num_classes=10, patch_size=4,
                                                           min_patch_size=4, max_patch_size=16, budget=40), 64),
}


def median_seconds(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_name() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-iters", type=int, default=7)
    parser.add_argument("--step-iters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    checkpoint = Path(tempfile.mkdtemp()) / "lcnet_050.pth"
    torch.save(timm.create_model("lcnet_050").state_dict(), checkpoint)
    print(f"cpu={cpu_name()!r} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"load average at start={os.getloadavg()[0]:.1f}")
    print("| setting | scorer | batch | tokenizer MACs | tokenizer img/s | step s | tokenizer share |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (geometry, batch) in SETTINGS.items():
        config = QuadformerConfig(**geometry, **SMALL)
        images = torch.randn(batch, config.in_chans, config.img_size, config.img_size)
        labels = torch.randint(0, config.num_classes, (batch,))
        model = build_model(config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer, images=images, labels=labels) -> None:
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()

        step_s = median_seconds(step, args.step_iters)
        base_tok_s = None
        for scorer in ("pixel-blur", "random", "feature"):
            scored = config.replace(scorer=scorer, scorer_checkpoint=str(checkpoint) if scorer == "feature" else "")
            tokenizer = tokenizer_from_config(scored).train()
            tok_s = median_seconds(lambda tokenizer=tokenizer, images=images: tokenizer(images), args.tokenizer_iters)
            base_tok_s = tok_s if base_tok_s is None else base_tok_s
            total_s = step_s - base_tok_s + tok_s
            macs = scored.flops_by_module()["tokenizer"]
            print(f"| {name} | {scorer} | {batch} | {format_flops(macs) if macs else 0} "
                  f"(model {format_flops(count_flops(scored))}) | {batch / tok_s:,.0f} | {total_s:.2f} | "
                  f"{100 * tok_s / total_s:.1f}% |")


if __name__ == "__main__":
    main()
