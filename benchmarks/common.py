"""Shared timing helpers for the benchmark scripts (not a test)."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Callable

import torch

from tokennas.speed import CLOCKS, Timings, interleaved  # noqa: F401  (the benchmarks' timing)


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


def format_ratio(ratio: tuple[float, float, float], rounds: int) -> str:
    median, low, high = ratio
    digits = 3 if median < 100 else 0
    return f"{median:,.{digits}f}x (IQR {low:,.{digits}f} to {high:,.{digits}f}, {rounds} paired rounds)"
