"""The search-space registry."""

from __future__ import annotations

from .base import Inputs, Space

SPACES: dict[str, Space] = {}


def register_space(space: Space) -> Space:
    SPACES[space.name] = space
    return space


def get_space(name: str) -> Space:
    if name not in SPACES:
        raise ValueError(f"unknown space {name!r}; expected one of: {', '.join(sorted(SPACES))}")
    return SPACES[name]


__all__ = ["SPACES", "Inputs", "Space", "get_space", "register_space"]

from . import crossvit, hvt, layers, psvit, quadtree, stt, tokens  # noqa: E402,F401  (register the spaces)
