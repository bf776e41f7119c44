"""HVT space (Pan et al., ICCV 2021): hierarchical 1D max pooling of the token sequence.

Following HVT, pooling (kernel 3, stride 2) happens after block ``pool_start`` and then every
``depth // stages`` blocks, each pooling followed by a fresh positional embedding; the head is
HVT's average pooling or, as a searched alternative, a class token.
"""

from __future__ import annotations

from typing import Any

from ..models.schedule_vit import ScheduleViTConfig
from . import register_space
from .base import Inputs, Space, uniform_patch


def hvt_positions(depth: int, start: int, stages: int, patch_tokens: int) -> tuple[int, ...]:
    """HVT's schedule: pool after ``start`` and every ``(depth - start) // stages`` blocks, while tokens last."""
    if stages == 0 or depth < 2:
        return ()
    width = max(1, (depth - start) // stages)
    positions = []
    for k in range(stages):
        b = min(start, depth - 2) + k * width
        if b > depth - 2 or patch_tokens < 3:
            break
        positions.append(b)
        patch_tokens = (patch_tokens - 3) // 2 + 1
    return tuple(positions)


class HVTSpace(Space):
    name = "hvt"
    description = ("HVT (Pan et al. 2021): where and how often the token sequence is max-pooled (kernel 3, "
                   "stride 2, a fresh positional embedding per stage), the average head or a class token, "
                   "plus width, depth and heads.")

    def dimensions(self, inputs: Inputs) -> dict[str, tuple[Any, ...]]:
        return {"embed_dim": (64, 96, 128, 192, 256, 384), "num_heads": (2, 4, 8), "depth": (4, 6, 8, 10, 12),
                "pool_stages": (0, 1, 2, 3, 4), "pool_start": (0, 1, 2), "head": ("avg", "class_token")}

    def unused(self, params: dict[str, Any], inputs: Inputs) -> set[str]:
        return {"pool_start"} if params.get("pool_stages") == 0 else set()

    def build(self, params: dict[str, Any], inputs: Inputs) -> ScheduleViTConfig:
        patch = uniform_patch(inputs.img_size)
        depth = params["depth"]
        return ScheduleViTConfig(
            img_size=inputs.img_size, in_chans=inputs.in_chans, num_classes=inputs.num_classes, patch_size=patch,
            embed_dim=params["embed_dim"], num_heads=params["num_heads"], depth=depth,
            class_token=params["head"] == "class_token", pool_kind="max1d", stage_pos_embed=True,
            pool_after=hvt_positions(depth, params["pool_start"], params["pool_stages"],
                                     (inputs.img_size // patch) ** 2),
        )


register_space(HVTSpace())
