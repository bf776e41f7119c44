"""Shared timing helpers for the benchmark scripts (not a test)."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch


def machine() -> str:
    """The device a benchmark ran on, in words."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except StopIteration:
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, torch on {torch.get_num_threads()} thread(s)"


def make_step(model: torch.nn.Module, images: torch.Tensor, train: bool) -> Callable[[], None]:
    """One forward (eval, no grad) or forward + cross-entropy + backward + AdamW step; bf16 autocast on CUDA."""
    device = images.device
    model = model.to(device).train(train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
    labels = torch.randint(0, 10, (images.shape[0],), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if train:
                loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
            else:
                with torch.no_grad():
                    model(images)
        if train:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


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


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU time, all threads


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


def format_ratio(ratio: tuple[float, float, float], rounds: int) -> str:
    median, low, high = ratio
    digits = 3 if median < 100 else 0
    return f"{median:,.{digits}f}x (IQR {low:,.{digits}f} to {high:,.{digits}f}, {rounds} paired rounds)"
