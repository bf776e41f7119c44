"""Throughput of our ``crossvit_9`` against timm's ``crossvit_9_240`` on the CPU: inference and a training step.

Both models hold the same weights. After a warm-up, steps alternate between the two (``common.interleaved``) and
the ratio is the median of the per-round ratios, so that a busy machine penalises neither. Target: ours / timm
>= 0.95. Run: ``.venv/bin/python benchmarks/bench_crossvit.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import format_ratio, interleaved, machine  # noqa: E402

import tokennas  # noqa: E402
import tokennas.models.crossvit  # noqa: E402, F401  (registers the presets)


def make_step(model: nn.Module, batch: int, train: bool) -> Callable[[], None]:
    """One inference forward or one AdamW training step on a fixed random batch."""
    x = torch.randn(batch, 3, 240, 240)
    target = torch.randint(0, 1000, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        model.train(train)
        if train:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), target).backward()
            optimizer.step()
        else:
            with torch.inference_mode():
                model(x)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="interleaved rounds per mode (one step each)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    reference = timm.create_model("crossvit_9_240", pretrained=False)
    ours = tokennas.build_model("crossvit_9")
    ours.load_state_dict(reference.state_dict())
    models = {"tokennas crossvit_9": ours, "timm crossvit_9_240": reference}
    print(f"machine: {machine()}; torch {torch.__version__}, timm {timm.__version__}; batch {args.batch}, 240px, "
          f"float32, {args.steps} interleaved rounds after a warm-up")
    for mode, train in (("inference", False), ("training step", True)):
        timings = interleaved({name: make_step(model, args.batch, train) for name, model in models.items()},
                              rounds=args.steps, warmup=1)
        ours_rate, timm_rate = (timings.rate(name, args.batch) for name in models)
        ratio = timings.speed_ratio("tokennas crossvit_9", "timm crossvit_9_240")
        print(f"{mode}: tokennas crossvit_9 {ours_rate:.1f} img/s, timm crossvit_9_240 {timm_rate:.1f} img/s, "
              f"ratio {format_ratio(ratio, args.steps)}")

if __name__ == "__main__":
    main()
