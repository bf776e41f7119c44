"""Counting speed: the analytic closed form against an fvcore trace, in configs per second.

Both count the same config in turn, round by round, after a warm-up (``common.interleaved``): the analytic
count 1000 times per round (one is too quick to time), fvcore once; the ratio is the median of the per-round ratios.

    python benchmarks/bench_counting.py
"""

from __future__ import annotations

import itertools
import random
import sys
from collections.abc import Callable
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).parent))
from common import format_ratio, interleaved, machine  # noqa: E402

import tokennas  # noqa: E402
from tokennas.spaces import Inputs, get_space  # noqa: E402

ANALYTIC_REPEATS = 1000  # analytic counts per round: one is too quick to time


def main() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space, inputs = get_space("psvit"), Inputs()
    grid = list(space.grid(inputs))
    configs = [space.build(p, inputs) for p in random.Random(0).sample(grid, 40)]
    print(f"machine: {machine()}; psvit space at 32px, {len(configs)} random configs")
    report("psvit at 32px", configs)  # target >= 1,000x
    for name in ("deit_small", "hvt_s_2"):
        report(f"{name} at 224px", [tokennas.load_config(name)] * 5)


def counter(method: str, repeats: int, configs: list) -> Callable[[], None]:
    """A step that counts the next config ``repeats`` times; two counters called once a round stay in lockstep."""
    queue = itertools.cycle(configs)

    def step() -> None:
        config = next(queue)
        for _ in range(repeats):
            tokennas.count_flops(config, method=method)

    return step


def report(what: str, configs: list) -> None:
    """Interleave ANALYTIC_REPEATS analytic counts and one fvcore trace of each config, round by round."""
    steps = {"analytic": counter("analytic", ANALYTIC_REPEATS, configs), "fvcore": counter("fvcore", 1, configs)}
    rounds = len(configs)
    timings = interleaved(steps, rounds=rounds, warmup=1)
    median, low, high = (r * ANALYTIC_REPEATS for r in timings.speed_ratio("analytic", "fvcore"))
    print(f"{what:18s} analytic {timings.rate('analytic', ANALYTIC_REPEATS):8.0f} configs/s | fvcore "
          f"{timings.rate('fvcore', 1):6.2f} configs/s | {format_ratio((median, low, high), rounds)}")


if __name__ == "__main__":
    main()
