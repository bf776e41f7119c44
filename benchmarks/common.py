"""Shared timing helpers for the benchmark scripts (not a test)."""

from __future__ import annotations

import platform
import subprocess
import time

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
    return f"{model}, {torch.get_num_threads()} threads"


def throughput(model: torch.nn.Module, images: torch.Tensor, train: bool, iters: int, warmup: int = 2) -> float:
    """Images per second of forward (eval) or forward+backward+AdamW step (train); bf16 autocast on CUDA."""
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

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images.shape[0] * iters / (time.perf_counter() - start)
