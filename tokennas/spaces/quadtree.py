"""The ``quadtree`` space: Quadformers (Ronen et al. 2023, arXiv 2304.00287) over the token budget, the range of
patch sizes of the mosaic and the saliency scorer."""

from __future__ import annotations

from typing import Any

from ..models.quadformer import QuadformerConfig
from ..models.quadtree import valid_budgets
from . import register_space
from .base import Inputs, Space

BUDGETS = (16, 28, 40, 52, 64, 100, 160)  # token targets, snapped to the nearest budget a mosaic can reach


def snap_budget(target: int, img_size: int, min_patch_size: int, max_patch_size: int) -> int:
    """The reachable budget nearest ``target``: the coarse grid plus a multiple of 3, at most the
    full grid of min patches."""
    valid = valid_budgets(img_size, min_patch_size, max_patch_size)
    splits = min(max((target - valid.start + 1) // 3, 0), len(valid) - 1)
    return valid[splits]


def snap_max_patch(requested: int, img_size: int, min_patch_size: int) -> int:
    """The largest ``min_patch_size * 2**k`` (k >= 0) not above ``requested`` that divides ``img_size``."""
    size = min_patch_size
    while 2 * size <= requested and img_size % (2 * size) == 0:
        size *= 2
    return size


class QuadtreeSpace(Space):
    name = "quadtree"
    description = (
        "Quadformers (Ronen et al. 2023): a plain ViT over a mixed-resolution mosaic. The image starts as a grid of "
        "max-size patches and the most salient patch is split into four until the token budget is spent, so "
        "background stays coarse and the object gets small patches; every patch is resized to the min patch size "
        "and placed by a sin-cos embedding of its centre plus a learned scale term. The space searches the token "
        "budget (snapped to what a mosaic can reach: the coarse grid plus 3 per split), the min and max patch sizes "
        "(the max snaps to the min times a power of 2), the saliency scorer (pixel-blur, random; feature only when "
        "the space is given scorer weights), the width, the depth and the number of heads."
    )

    def __init__(self, scorer_checkpoint: str = "") -> None:
        self.scorer_checkpoint = scorer_checkpoint  # lcnet_050 weights for the feature scorer, or "timm"

    def dimensions(self, inputs: Inputs) -> dict[str, tuple[Any, ...]]:
        n = inputs.img_size
        return {  # the patch sizes first: they decide which token budgets a mosaic reaches
            "min_patch_size": tuple(p for p in range(1, n + 1) if n % p == 0 and 4 <= n // p <= 16),
            "max_patch_size": tuple(sorted({n // 4, n // 2, n} - {0})),
            "budget": BUDGETS,
            "scorer": ("pixel-blur", "random", "feature") if self.scorer_checkpoint else ("pixel-blur", "random"),
            "embed_dim": (32, 64, 96, 128, 192),
            "depth": (2, 4, 6, 8, 12),
            "num_heads": (1, 2, 4),
        }

    def unused(self, params: dict[str, Any], inputs: Inputs) -> set[str]:
        """The budget where every target snaps to one reachable budget (min patches tiling the image in at most
        16 tokens: every target asks for their full grid)."""
        if "max_patch_size" not in params or "budget" in params:
            return set()
        min_patch = params["min_patch_size"]
        max_patch = snap_max_patch(params["max_patch_size"], inputs.img_size, min_patch)
        return {"budget"} if len({snap_budget(t, inputs.img_size, min_patch, max_patch) for t in BUDGETS}) == 1 \
            else set()

    def build(self, params: dict[str, Any], inputs: Inputs) -> QuadformerConfig:
        min_patch = params["min_patch_size"]
        max_patch = snap_max_patch(params["max_patch_size"], inputs.img_size, min_patch)
        return QuadformerConfig(
            img_size=inputs.img_size, in_chans=inputs.in_chans, num_classes=inputs.num_classes,
            patch_size=min_patch, min_patch_size=min_patch, max_patch_size=max_patch,
            budget=snap_budget(params["budget"], inputs.img_size, min_patch, max_patch),
            scorer=params["scorer"], scorer_checkpoint=self.scorer_checkpoint if params["scorer"] == "feature" else "",
            embed_dim=params["embed_dim"], depth=params["depth"], num_heads=params["num_heads"],
        )


register_space(QuadtreeSpace())
