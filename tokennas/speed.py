"""Measured speed: contenders timed in turn (interleaved), compared by the median of paired ratios.

This machine may be shared and noisy: a slow spell stretches both steps of a pair and cancels in their ratio. The
search's frozen strategy measures every exported schedule against its parent with ``throughput_against``; the
benchmark scripts use ``interleaved`` directly.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU time, all threads


@dataclasses.dataclass
class Timings:
    """Seconds per step of each contender, round by round: round i timed every contender once, in turn."""

    seconds: dict[str, list[float]]

    def speed_ratio(self, a: str, b: str) -> tuple[float, float, float]:
        """How many times faster ``a`` ran than ``b``: median of the per-round ratios, and their 25th/75th percentile.

        Each ratio pairs two steps taken back to back, so a slow spell of the machine slows both and cancels.
        """
        ratios = sorted(tb / ta for ta, tb in zip(self.seconds[a], self.seconds[b], strict=True))
        if len(ratios) < 2:
            return ratios[0], ratios[0], ratios[0]
        low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
        return statistics.median(ratios), low, high

    def rate(self, name: str, items: int) -> float:
        """Items per second at the median step time."""
        return items / statistics.median(self.seconds[name])


def interleaved(steps: dict[str, Callable[[], None]], rounds: int, warmup: int = 2, clock: str = "wall") -> Timings:
    """Warm every step up, then time ``rounds`` rounds of one step each, in turn (the order rotates every round).

    ``clock="cpu"`` counts the process's CPU time rather than wall-clock: on a shared CPU other processes' load then
    stretches neither step (use it with one thread, so that no thread spins while waiting for another).
    """
    timer = CLOCKS[clock]
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = timer()
            steps[name]()
            seconds[name].append(timer() - start)
    return Timings(seconds)


def forward_step(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], None]:
    """One inference forward (eval, no grad; bf16 autocast on CUDA, synchronised)."""
    device = images.device
    model = model.to(device).eval()

    def step() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def throughput_against(reference: torch.nn.Module, models: dict[str, torch.nn.Module], img_size: int, in_chans: int,
                       batch_sizes: tuple[int, ...] = (1, 256), rounds: int = 7,
                       device: torch.device | str = "cpu", clock: str = "wall") -> list[dict[str, float | int | str]]:
    """Each model's inference speed against ``reference`` at each batch size, interleaved with it: one row per
    (model, batch) with ``speedup`` (median paired ratio, > 1: faster than the reference), its quartiles and both
    images-per-second figures. Small batches get more rounds (their steps are short and noisy). ``clock``: as
    ``interleaved`` takes it (``cpu``: this process's CPU time, for a shared machine)."""
    rows, base = [], "\0reference"  # a key no model's name can take
    for batch in batch_sizes:
        images = torch.randn(batch, in_chans, img_size, img_size, device=device)
        steps = {base: forward_step(reference, images)}
        steps.update({name: forward_step(model, images) for name, model in models.items()})
        n = rounds * (5 if batch <= 8 else 1)
        timings = interleaved(steps, n, clock=clock)
        for name in models:
            speedup, low, high = timings.speed_ratio(name, base)
            rows.append({"name": name, "batch": batch, "speedup": speedup, "speedup_q1": low, "speedup_q3": high,
                         "images_per_s": timings.rate(name, batch),
                         "reference_images_per_s": timings.rate(base, batch), "rounds": n})
    return rows


def training_macs_per_second(config, batch: int = 4, steps: int = 2) -> float:
    """This machine's training speed for models like ``config``, in forward MACs per second: ``steps`` forward and
    backward passes of ``config`` at ``batch`` images, timed after one warm-up (a training step costs about three
    forwards; the count returned is of forward MACs, so that an epoch takes ``(3 * train + val) * MACs / rate``). The
    live table's yardstick for its ETA until a search's first epoch is timed."""
    from .config import build_model

    model = build_model(config).train()
    images = torch.randn(batch, config.in_chans, config.img_size, config.img_size)
    labels = torch.zeros(batch, dtype=torch.long)

    def step() -> None:
        torch.nn.functional.cross_entropy(model(images), labels).backward()

    timings = interleaved({"train": step}, steps, warmup=1)
    return 3 * batch * sum(config.flops_by_module().values()) / statistics.median(timings.seconds["train"])
