"""PSViT space (Chen et al. 2021, arXiv 2108.03428): spatial token pooling plus attention sharing.

PSViT builds a compact set of pooling and sharing combinations and learns the choice. Here a pooling
schedule says after which fraction of the depth the token grid is pooled (2x2 fewer tokens each
time); a sharing pattern says which blocks reuse the attention map of the block before them, only
ever inside a stage, where both blocks see the same tokens.
"""

from __future__ import annotations

from typing import Any

from ..models.schedule_vit import ScheduleViTConfig
from . import register_space
from .base import Inputs, Space, uniform_patch

# Pooling schedules as fractions of the depth after which the grid is pooled.
POOL_SCHEDULES = {"none": (), "late": (1 / 2,), "early": (1 / 4,), "two-stage": (1 / 3, 2 / 3),
                  "three-stage": (1 / 4, 1 / 2, 3 / 4)}
SHARING = ("none", "alternate", "per-stage")  # alternate: every second block of a stage; per-stage: all but the first


def pool_positions(depth: int, fractions: tuple[float, ...]) -> tuple[int, ...]:
    """Blocks after which to pool, for a depth: increasing, unique, never after the last block."""
    return tuple(sorted({min(depth - 2, max(0, round(f * depth) - 1)) for f in fractions})) if depth > 1 else ()


def shared_blocks(depth: int, pool_after: tuple[int, ...], pattern: str) -> tuple[int, ...]:
    """Blocks that reuse the previous map under ``pattern``; never the first block of a stage."""
    if pattern == "none":
        return ()
    starts = {0, *(b + 1 for b in pool_after)}
    shared, position = [], 0
    for b in range(depth):
        position = 0 if b in starts else position + 1
        if position and (pattern == "per-stage" or position % 2 == 1):
            shared.append(b)
    return tuple(shared)


class PSViTSpace(Space):
    name = "psvit"
    description = ("PSViT (Chen et al. 2021): token pooling on the patch grid chooses how many tokens each block "
                   "sees, and blocks inside a stage may reuse the attention map of the block before them; plus "
                   "width, depth and heads of an isotropic ViT with a class token.")

    def dimensions(self, inputs: Inputs) -> dict[str, tuple[Any, ...]]:
        return {"embed_dim": (64, 96, 128, 192, 256, 384), "num_heads": (2, 4, 8), "depth": (4, 6, 8, 10, 12),
                "pool_schedule": tuple(POOL_SCHEDULES), "pool_kind": ("max2d", "avg2d", "conv2d"),
                "attn_sharing": SHARING}

    def unused(self, params: dict[str, Any], inputs: Inputs) -> set[str]:
        unused = {"pool_kind"} if params.get("pool_schedule") == "none" else set()
        if "pool_schedule" in params:  # stages of one block each (depth 4, three stages): nothing can share
            pool_after = pool_positions(params["depth"], POOL_SCHEDULES[params["pool_schedule"]])
            unused |= set() if shared_blocks(params["depth"], pool_after, "per-stage") else {"attn_sharing"}
        return unused

    def build(self, params: dict[str, Any], inputs: Inputs) -> ScheduleViTConfig:
        depth = params["depth"]
        pool_after = pool_positions(depth, POOL_SCHEDULES[params["pool_schedule"]])
        return ScheduleViTConfig(
            img_size=inputs.img_size, in_chans=inputs.in_chans, num_classes=inputs.num_classes,
            patch_size=uniform_patch(inputs.img_size), embed_dim=params["embed_dim"], num_heads=params["num_heads"],
            depth=depth, pool_kind=params["pool_kind"] if pool_after else "max2d", pool_after=pool_after,
            share_attn=shared_blocks(depth, pool_after, params["attn_sharing"]),
        )


register_space(PSViTSpace())
