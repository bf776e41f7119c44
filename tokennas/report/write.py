"""Atomic writes: every report file appears whole or not at all (``train.write_atomic``)."""

from __future__ import annotations

from pathlib import Path

from ..train import write_atomic


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))
