"""Shipped parents: trained uniform ViTs whose weights every ScheduleViT schedule of the same trunk can run on.

A parent is a folder ``<root>/<name>/`` holding ``checkpoint.pt`` (a ``tokennas train`` checkpoint),
``config.yaml`` (what it trains), ``metrics.json`` (its test accuracy) and optionally ``command.txt`` (the exact
training command) and ``train.log``. A folder without ``checkpoint.pt`` is a parent not built yet: it is not
listed, and asking for it is refused naming what is missing.

The roots searched, first match wins: the folders in the environment variable ``TOKENNAS_PARENTS_DIR``
(several separated by ``os.pathsep``; tests and private parents live there), then ``PARENTS_DIR``, this package
folder. ``--parent NAME`` (``tokennas search``, ``tokennas evaluate``) and ``load_parent("NAME", ...)`` take a
parent's name wherever they take a checkpoint path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PARENTS_DIR = Path(__file__).resolve().parent
PARENTS_ENV = "TOKENNAS_PARENTS_DIR"  # extra roots, searched before PARENTS_DIR
CHECKPOINT = "checkpoint.pt"


def parent_roots() -> list[Path]:
    """The folders searched for parents, first match wins: ``$TOKENNAS_PARENTS_DIR`` entries, then ``PARENTS_DIR``."""
    extra = [Path(p) for p in os.environ.get(PARENTS_ENV, "").split(os.pathsep) if p]
    return [*extra, PARENTS_DIR]


def _folder(name: str) -> Path | None:
    """The first root's folder called ``name`` (built or not); None for anything that is not a plain name."""
    if not name or name != Path(name).name or name.startswith((".", "_")):
        return None
    return next((root / name for root in parent_roots() if (root / name).is_dir()), None)


def list_parents() -> list[str]:
    """Names of the built parents (folders with a ``checkpoint.pt``), sorted."""
    names = set()
    for root in parent_roots():
        if root.is_dir():
            names.update(p.name for p in root.iterdir() if _folder(p.name) == p and (p / CHECKPOINT).is_file())
    return sorted(names)


def _built(name: str) -> Path | None:
    """A parent's folder when ``name`` names one; a ``ValueError`` when that folder has no checkpoint yet."""
    folder = _folder(name)
    if folder is None:
        return None
    if not (folder / CHECKPOINT).is_file():
        raise ValueError(f"parent {name!r} is not built yet: {str(folder)!r} has no {CHECKPOINT} (built parents: "
                         f"{', '.join(list_parents()) or 'none'})")
    return folder


def is_parent(name: str) -> bool:
    """``name`` is a parent's name, built or not (a built one resolves, an unbuilt one is refused by name)."""
    return _folder(str(name)) is not None


def resolve_parent(name_or_path: str | Path) -> Path:
    """``--parent`` as a file: a shipped parent's name gives its ``checkpoint.pt``, an existing file itself.

    Anything else is a one-line ``ValueError`` naming the value and the shipped parents; a parent whose folder
    has no checkpoint yet is refused as not built.
    """
    folder = _built(str(name_or_path))
    if folder is not None:
        return folder / CHECKPOINT
    path = Path(name_or_path)
    if path.is_file():
        return path
    raise ValueError(f"invalid --parent {str(name_or_path)!r}: neither a file nor a shipped parent (shipped: "
                     f"{', '.join(list_parents()) or 'none'})")


def parent_info(name: str) -> dict[str, Any]:
    """What ``tokennas presets`` shows of a built parent: name, path (its checkpoint), config (``ModelConfig``, from
    config.yaml, else from the checkpoint), test_acc (metrics.json's, None without one), command (command.txt's
    text, None without one)."""
    folder = _built(name)
    if folder is None:
        raise ValueError(f"unknown parent {name!r}; expected one of: {', '.join(list_parents()) or 'none'}")
    from ..config import config_from_dict, load_config

    if (folder / "config.yaml").is_file():
        config = load_config(folder / "config.yaml")
    else:
        import torch

        config = config_from_dict(torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=True)["config"])
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    command = (folder / "command.txt").read_text().strip() if (folder / "command.txt").is_file() else None
    return {"name": name, "path": folder / CHECKPOINT, "config": config, "test_acc": metrics.get("test_acc"),
            "command": command}
