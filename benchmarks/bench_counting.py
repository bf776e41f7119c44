"""Counting speed: the analytic closed form against an fvcore trace, in configs per second.

    python benchmarks/bench_counting.py
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

import tokennas  # noqa: E402
from tokennas.spaces import Inputs, get_space  # noqa: E402


def main() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space, inputs = get_space("psvit"), Inputs()
    grid = list(space.grid(inputs))
    configs = [space.build(p, inputs) for p in random.Random(0).sample(grid, 400)]
    print(f"machine: {machine()}; psvit space at 32px, {len(configs)} random configs")
    start = time.perf_counter()
    for _ in range(10):
        for config in configs:
            tokennas.count_flops(config, method="analytic")
    analytic = 10 * len(configs) / (time.perf_counter() - start)
    start = time.perf_counter()
    for config in configs[:40]:
        tokennas.count_flops(config, method="fvcore")
    fvcore = 40 / (time.perf_counter() - start)
    print(f"analytic {analytic:10.0f} configs/s | fvcore {fvcore:6.2f} configs/s | {analytic / fvcore:,.0f}x "
          "(target >= 1,000x)")
    for name in ("deit_small", "hvt_s_2"):
        start = time.perf_counter()
        for _ in range(1000):
            tokennas.count_flops(name, method="analytic")
        a = 1000 / (time.perf_counter() - start)
        start = time.perf_counter()
        tokennas.count_flops(name, method="fvcore")
        f = 1 / (time.perf_counter() - start)
        print(f"{name:10s} at 224px: analytic {a:8.0f} configs/s | fvcore {f:5.2f} configs/s | {a / f:,.0f}x")


if __name__ == "__main__":
    main()
