"""The ``crossvit`` space: two-branch CrossViT (Chen et al., ICCV 2021) over widths, patch sizes and depths."""

from __future__ import annotations

from typing import Any

from ..models.crossvit import CrossViTConfig
from . import register_space
from .base import Inputs, Space, uniform_patch


def branch_img_size(img_size: int, patch_size: int) -> int:
    """The largest multiple of the patch within the image; the branch resizes to it, as the paper's 240 -> 224."""
    return img_size - img_size % patch_size


class CrossViTSpace(Space):
    name = "crossvit"
    description = (
        "CrossViT (Chen et al. 2021): a small-patch and a large-patch branch, each its own ViT, run side by side "
        "through K multi-scale encoders; in each, the small branch runs N blocks and the large branch M, then L "
        "cross-attention fusions let each branch's class token attend to the other branch's patch tokens. The space "
        "searches both widths, both patch sizes (so both token counts; the small branch tiles the image, the large "
        "branch resizes it to a multiple of its patch, as the paper does 240 -> 224), N, M, K, L, the number of "
        "heads and the MLP ratio. The head averages the logits of the two class tokens."
    )

    def dimensions(self, inputs: Inputs) -> dict[str, tuple[Any, ...]]:
        img, unit = inputs.img_size, uniform_patch(inputs.img_size)  # unit: the patch of a DeiT-style ~8x8 grid
        return {
            "small_dim": (32, 48, 64, 96),
            "large_dim": (64, 96, 128, 192),
            "small_patch": tuple(dict.fromkeys((max(1, unit // 2), unit))),  # ~16x16 and ~8x8 grids
            "large_patch": tuple(dict.fromkeys(min(img, round(unit * f)) for f in (1.5, 2, 2.5))),
            "small_depth": (1, 2),  # N
            "large_depth": (1, 2, 3, 4),  # M
            "num_encoders": (1, 2, 3),  # K
            "num_fusions": (1, 2),  # L
            "num_heads": (1, 2, 4),
            "mlp_ratio": (2.0, 3.0, 4.0),
        }

    def build(self, params: dict[str, Any], inputs: Inputs) -> CrossViTConfig:
        patches = (params["small_patch"], params["large_patch"])
        return CrossViTConfig(
            img_size=inputs.img_size, in_chans=inputs.in_chans, num_classes=inputs.num_classes,
            branch_img_size=tuple(branch_img_size(inputs.img_size, p) for p in patches), patch_size=patches,
            embed_dim=(params["small_dim"], params["large_dim"]), depth=(params["small_depth"], params["large_depth"]),
            num_heads=(params["num_heads"],) * 2, mlp_ratio=(params["mlp_ratio"],) * 2,
            num_encoders=params["num_encoders"], num_fusions=params["num_fusions"],
        )


register_space(CrossViTSpace())
