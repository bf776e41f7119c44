"""The ``stt`` space: super-token transformers (Farooq et al. 2021, arXiv 2111.13156) over window size and
where global super-token attention runs."""

from __future__ import annotations

import math
from typing import Any

from ..models.supertoken import SuperTokenConfig
from . import register_space
from .base import Inputs, Space, uniform_patch

# Where global super-token attention opens a block; block 0 is skipped because its super tokens are still
# the learned, image-independent initial vectors.
GLOBAL_PATTERNS = ("none", "middle", "upper", "alternate", "every")


def global_blocks(pattern: str, depth: int) -> tuple[int, ...]:
    """Block indices for a named placement of global super-token attention."""
    if pattern == "none":  # windows never talk: a bag of window summaries
        return ()
    if pattern == "middle":  # one exchange half-way up
        return (max(1, depth // 2),) if depth > 1 else ()
    if pattern == "upper":  # the upper half: the abstract's higher layers, where work is mostly on super tokens
        return tuple(range(max(1, depth // 2), depth))
    if pattern == "alternate":
        return tuple(range(1, depth, 2))
    if pattern == "every":
        return tuple(range(1, depth))
    raise ValueError(f"`global_pattern` must be one of {', '.join(GLOBAL_PATTERNS)}, got {pattern!r}")


def window_patch(img_size: int, window_size: int) -> tuple[int, int]:
    """(patch size, window size): the window divides the token grid, the grid is near the DeiT-style one.

    A grid of a single window costs as much as one octave of distance; if no grid fits the window at all,
    the whole DeiT-style grid becomes one window.
    """
    target = img_size // uniform_patch(img_size)
    fits = [(abs(math.log2(img_size // p / target)) + (img_size // p == window_size), p)
            for p in range(1, img_size + 1) if img_size % p == 0 and (img_size // p) % window_size == 0]
    if not fits:
        return uniform_patch(img_size), target
    return min(fits)[1], window_size


class STTSpace(Space):
    name = "stt"
    description = (
        "Super-token transformers (Farooq et al. 2021): an isotropic ViT whose patch tokens attend only within "
        "M x M windows, each window with one learned super token that joins its window's attention; super tokens "
        "attend to each other globally in chosen blocks and the head reads only the super tokens. The space "
        "searches the window size M (the patch size follows so that M divides the token grid), where global "
        "super-token attention runs (none, one middle block, the upper half, every second block, every block), "
        "the width, the depth and the number of heads."
    )

    def dimensions(self, inputs: Inputs) -> dict[str, tuple[Any, ...]]:
        return {
            "window_size": (2, 4) if inputs.img_size < 128 else (2, 4, 7),
            "global_pattern": GLOBAL_PATTERNS,
            "embed_dim": (32, 64, 96, 128, 192),
            "depth": (2, 4, 6, 8, 12),
            "num_heads": (1, 2, 4),
        }

    def build(self, params: dict[str, Any], inputs: Inputs) -> SuperTokenConfig:
        patch, window = window_patch(inputs.img_size, params["window_size"])
        return SuperTokenConfig(
            img_size=inputs.img_size, in_chans=inputs.in_chans, num_classes=inputs.num_classes,
            patch_size=patch, window_size=window, embed_dim=params["embed_dim"], depth=params["depth"],
            num_heads=params["num_heads"], global_blocks=global_blocks(params["global_pattern"], params["depth"]),
        )


register_space(STTSpace())
