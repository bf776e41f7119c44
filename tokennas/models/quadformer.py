"""Quadformer: a ViT over a mixed-resolution quadtree mosaic.

Follows Ronen, Levy and Golbert 2023, "Vision Transformers with Mixed-Resolution Tokenization" (CVPR-W 2023,
arXiv 2304.00287): the tokenizer (``quadtree.py``) turns each image into ``budget`` patches of 1, 2, 4... times the
min patch size, split where the scorer finds saliency; every patch is resized to ``patch_size`` pixels and
embedded by one linear layer; the transformer is the plain ViT (the same ``Block``s as ScheduleViT).

Position: a fixed 2D sin-cos embedding of each patch's centre (in units of the min patch, as the paper's code
does) plus a learned embedding of its scale (one vector per quadtree level), since the paper's centres alone do
not say how large a patch is. The class token gets no positional term.

With ``budget`` equal to the full grid of min patches and ``patch_size == min_patch_size``, the mosaic is the
uniform grid in raster order and the model is a uniform ViT whose positional embedding is fixed (a ScheduleViT
with copied weights and ``pos_embed`` set to these values gives the same logits).

Presets reproduce the settings we could verify offline: patches of 16, 32 and 64 pixels resized to 16 with ViT-S
and ViT-B widths (the paper, per its summaries), at 256px with a 100-token budget (the authors' tokenization example,
examples/02_tokenization.ipynb, which also uses ViT-S's width). A budget of 196 tokens equals the uniform grid of
DeiT-S / ViT-B/16 at 224px, so that preset costs exactly what the uniform model costs (the paper reports accuracy
against token count and GMACs). The paper's per-table resolutions, budgets and ImageNet accuracies were out of reach
offline and are not claimed. Presets use the pixel-blur scorer, which needs no weights; the paper's main scorer is
``feature`` (``config.replace(scorer="feature", scorer_checkpoint=...)``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import init_weights_vit_timm
from torch import nn

from ..config import ModelConfig, register_family, register_preset
from .layers import Block, LayerNorm, block_flops, block_params, check_trunk, ln_flops
from .pretrained import TimmModel
from .quadtree import SCORERS, check_geometry, num_levels, scorer_costs, tokenizer_from_config


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuadformerConfig(ModelConfig):
    """A ViT over a quadtree mosaic of ``budget`` mixed-resolution patches (Quadformer)."""

    family: ClassVar[str] = "quadformer"
    patch_size: int = 16  # every mosaic patch is area-resized to this; divides min_patch_size
    min_patch_size: int = 16
    max_patch_size: int = 64  # min_patch_size times a power of 2; divides img_size
    budget: int = 100  # patch tokens per image (class token not counted): the coarse grid plus 3 per split
    scorer: str = "pixel-blur"  # pixel-blur: no weights; feature: a small CNN's features; random: ablation
    scorer_checkpoint: str = ""  # feature scorer: a lcnet_050 state-dict file, or "timm" for timm's weights
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0  # training regulariser; no effect on cost

    def validate(self) -> None:
        check_geometry(self.img_size, self.patch_size, self.min_patch_size, self.max_patch_size, self.budget)
        if self.scorer not in SCORERS:
            raise ValueError(f"`scorer` must be one of {', '.join(SCORERS)}, got {self.scorer!r}")
        if self.scorer == "feature" and not self.scorer_checkpoint:
            raise ValueError("`scorer_checkpoint` is required for scorer 'feature': a lcnet_050 state-dict file, or "
                             "'timm' for timm's pretrained weights; without weights the features would be random")
        check_trunk(self)
        if self.embed_dim % 4:
            raise ValueError(f"`embed_dim` ({self.embed_dim}) must be a multiple of 4 for the 2D sin-cos embedding")

    @property
    def num_levels(self) -> int:
        return num_levels(self.min_patch_size, self.max_patch_size)

    def tokens_per_block(self) -> dict[str, tuple[int, ...]]:
        return {"tokens": (self.budget + 1,) * self.depth}

    def flops_by_module(self) -> dict[str, int]:
        D, N = self.embed_dim, self.budget + 1
        tokenizer, _ = scorer_costs(self.scorer, self.img_size, self.in_chans, self.min_patch_size,
                                    self.max_patch_size)  # area resizing, sorting and gathering cost no MACs
        flops = {"tokenizer": tokenizer, "patch_embed": self.budget * self.in_chans * self.patch_size**2 * D}
        flops.update({f"blocks.{b}": block_flops(N, D, self.mlp_ratio) for b in range(self.depth)})
        flops["norm"] = ln_flops(N, D)
        flops["head"] = D * self.num_classes
        return flops

    def num_params(self) -> int:
        D = self.embed_dim
        _, total = scorer_costs(self.scorer, self.img_size, self.in_chans, self.min_patch_size, self.max_patch_size)
        total += self.in_chans * self.patch_size**2 * D + D  # linear patch embedding
        total += D + self.num_levels * D  # class token, scale embedding
        total += self.depth * block_params(D, self.mlp_ratio, self.qkv_bias)
        return total + 2 * D + D * self.num_classes + self.num_classes


def sincos_2d(centres: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """(..., 2) centres as (x, y) -> (..., 4 * len(omega)): [sin x, cos x, sin y, cos y] (MAE's 2D sin-cos)."""
    x = centres[..., 0:1] * omega
    y = centres[..., 1:2] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=-1)


class Quadformer(TimmModel, nn.Module):
    """ViT over a quadtree mosaic: tokenizer -> linear patch embedding + centre/scale embedding -> ViT blocks."""

    def __init__(self, config: QuadformerConfig, norm_layer: type[nn.Module] = LayerNorm) -> None:
        super().__init__()
        self.config = c = config
        D = c.embed_dim
        self.num_classes = c.num_classes
        self.num_prefix_tokens = 1
        self.tokenizer = tokenizer_from_config(c)
        self.patch_embed = nn.Linear(c.in_chans * c.patch_size**2, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.scale_embed = nn.Parameter(torch.zeros(c.num_levels, D))  # one vector per patch size
        self.register_buffer("omega", 10000.0 ** -(torch.arange(D // 4) / (D // 4)), persistent=False)
        drop_path = torch.linspace(0, c.drop_path_rate, c.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(D, c.num_heads, c.mlp_ratio, c.qkv_bias, drop_path=drop_path[b], norm_layer=norm_layer)
            for b in range(c.depth)
        )
        self.norm = norm_layer(D)
        self.head = nn.Linear(D, c.num_classes)
        trunc_normal_(self.scale_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        # timm's ViT init; the patch embedding keeps PyTorch's default, as ViT's patch conv does (same fan-in),
        # and the scorer CNN keeps its loaded weights
        for module in (*self.blocks.modules(), self.head):
            init_weights_vit_timm(module)
        self.init_pretrained_cfg()

    @classmethod
    def timm_layers(cls, config: QuadformerConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return ("patch_embed",), ("head",)  # a Linear over flattened patches: timm cannot adapt it, only load it

    def pos_embed(self, centres: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """(B, N, 2) centres and (B, N) levels -> (B, N, D): sin-cos of the centre plus the learned scale term."""
        return sincos_2d(centres, self.omega) + self.scale_embed[levels]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        mosaic = self.tokenizer(x)
        x = self.patch_embed(mosaic.pixels) + self.pos_embed(mosaic.centres, mosaic.levels)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)[0]
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


register_family(QuadformerConfig, Quadformer)

_SMALL = dict(embed_dim=384, num_heads=6)
_BASE = dict(embed_dim=768, num_heads=12)
_PAPER = dict(img_size=256, patch_size=16, min_patch_size=16, max_patch_size=64)

for _name, _args, _doc in [
    ("quadformer_s_256_100", {**_SMALL, **_PAPER, "budget": 100},
     "Quadformer-S (Ronen et al. 2023): ViT-S over 100 patches of 16/32/64px at 256px, the authors' tokenization "
     "example; 21.98M params, 2.27G MACs (a uniform 16px ViT-S with 100 tokens). Accuracy not reproduced."),
    ("quadformer_s_256_196", {**_SMALL, **_PAPER, "budget": 196},
     "Quadformer-S with DeiT-S's token count: 196 patches of 16/32/64px at 256px; 4.61G MACs, DeiT-S's exactly."),
    ("quadformer_b_256_100", {**_BASE, **_PAPER, "budget": 100},
     "Quadformer-B: ViT-B over 100 patches of 16/32/64px at 256px; 86.42M params, 8.84G MACs."),
    ("quadformer_b_256_196", {**_BASE, **_PAPER, "budget": 196},
     "Quadformer-B with ViT-B/16's 224px token count: 196 patches of 16/32/64px at 256px; 17.58G MACs."),
]:
    register_preset(_name, QuadformerConfig(**_args), _doc)
