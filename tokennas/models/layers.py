"""What the families share: an attention that can hand its map on, a pre-norm block, token pooling.

Parameter names follow timm's ``VisionTransformer`` (``attn.qkv``, ``attn.proj``, ``mlp.fc1``...) so
that an identity schedule loads timm state dicts unchanged.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

LayerNorm = partial(nn.LayerNorm, eps=1e-6)  # timm's ViT and CrossViT epsilon, for every family


class Attention(nn.Module):
    """Multi-head self-attention whose map can be reused by the next block (PSViT attention sharing).

    ``share_attn=True``: the block holds only a value projection and applies the attention map it is
    given, so it has no Q/K weights, no QK^T product and no softmax. ``return_attn=True``: the map is
    materialised for the next block; otherwise fused SDPA runs.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, share_attn: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"`num_heads` ({num_heads}) must divide the width ({dim})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.share_attn = share_attn
        if share_attn:
            self.v = nn.Linear(dim, dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, shared_attn: torch.Tensor | None = None,
                return_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, C = x.shape
        if self.share_attn:
            if shared_attn is None:
                raise RuntimeError("a sharing attention block was called without an attention map")
            v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, N, hd)
            attn = shared_attn
            x = attn @ v
        else:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # (B, nh, N, hd) each
            drop = self.attn_drop if self.training else 0.0
            if return_attn:
                attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, nh, N, N)
                x = F.dropout(attn, drop, self.training) @ v
            else:
                attn = None
                x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        x = self.proj(x.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(x), attn


class Block(nn.Module):
    """Pre-norm transformer block, timm-compatible names; passes an attention map through."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 share_attn: bool = False, drop_path: float = 0.0, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, norm_layer: type[nn.Module] = LayerNorm,
                 mlp_layer: type[nn.Module] = Mlp, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, share_attn, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, shared_attn: torch.Tensor | None = None,
                return_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, attn = self.attn(self.norm1(x), shared_attn, return_attn)
        x = x + self.drop_path1(y)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x, attn


def check_trunk(config) -> None:
    """The checks every isotropic trunk shares: depth, heads dividing the width, MLP ratio."""
    if config.depth < 1:
        raise ValueError(f"`depth` must be at least 1, got {config.depth}")
    if config.embed_dim < 1 or config.num_heads < 1 or config.embed_dim % config.num_heads:
        raise ValueError(f"`num_heads` ({config.num_heads}) must divide `embed_dim` ({config.embed_dim})")
    if config.mlp_ratio <= 0:
        raise ValueError(f"`mlp_ratio` must be positive, got {config.mlp_ratio}")


POOL_KINDS = ("max1d", "max2d", "avg2d", "conv2d")


def pooled_length(kind: str, patch_tokens: int, grid: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """Patch tokens and grid after one pooling step (class tokens are not pooled)."""
    if kind == "max1d":  # kernel 3, stride 2, no padding: HVT
        return (patch_tokens - 3) // 2 + 1, (0, 0)
    h, w = (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))  # kernel 3, stride 2, padding 1
    return h * w, (h, w)


class TokenPool(nn.Module):
    """Reduces the patch tokens between two blocks; class tokens pass through untouched.

    ``max1d``: HVT's 1D max pooling over the sequence (kernel 3, stride 2). ``max2d``/``avg2d``/
    ``conv2d``: pooling on the token grid (kernel 3, stride 2, padding 1; ``conv2d`` is a strided
    depthwise conv), PSViT's spatial token pooling. ``pos_tokens > 0`` adds a fresh learned positional
    embedding after pooling, as HVT does at every stage.
    """

    def __init__(self, kind: str, dim: int, num_prefix_tokens: int, grid: tuple[int, int],
                 pos_tokens: int = 0) -> None:
        super().__init__()
        if kind not in POOL_KINDS:
            raise ValueError(f"`pool_kind` must be one of {POOL_KINDS}, got {kind!r}")
        self.kind = kind
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = grid
        self.conv = nn.Conv2d(dim, dim, 3, 2, 1, groups=dim) if kind == "conv2d" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_tokens, dim)) if pos_tokens else None
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prefix, tokens = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        B, N, C = tokens.shape
        if self.kind == "max1d":
            tokens = F.max_pool1d(tokens.transpose(1, 2), 3, 2).transpose(1, 2)
        else:
            grid = tokens.transpose(1, 2).reshape(B, C, *self.grid)  # (B, C, h, w)
            if self.kind == "max2d":
                grid = F.max_pool2d(grid, 3, 2, 1)
            elif self.kind == "avg2d":
                grid = F.avg_pool2d(grid, 3, 2, 1, count_include_pad=False)
            else:
                grid = self.conv(grid)
            tokens = grid.flatten(2).transpose(1, 2)
        x = torch.cat([prefix, tokens], dim=1)
        return x if self.pos_embed is None else x + self.pos_embed


def ln_flops(tokens: int, dim: int) -> int:
    """fvcore's LayerNorm count: 5 per element with an affine transform."""
    return 5 * tokens * dim


def attention_flops(tokens: int, dim: int, share_attn: bool = False) -> int:
    """MACs of ``Attention`` over ``tokens`` tokens: input projections, QK^T (unless shared), AV, output projection."""
    if share_attn:
        return tokens * dim * dim + tokens * tokens * dim + tokens * dim * dim
    return 3 * tokens * dim * dim + 2 * tokens * tokens * dim + tokens * dim * dim


def attention_params(dim: int, qkv_bias: bool = True, share_attn: bool = False) -> int:
    """Parameters of ``Attention``: Q, K, V projections (only V when shared) and the output projection."""
    return (1 if share_attn else 3) * dim * (dim + int(qkv_bias)) + dim * dim + dim


def block_flops(tokens: int, dim: int, mlp_ratio: float, share_attn: bool = False) -> int:
    """MACs of one ``Block`` over ``tokens`` tokens: two norms, attention, MLP."""
    hidden = int(dim * mlp_ratio)
    return 2 * ln_flops(tokens, dim) + attention_flops(tokens, dim, share_attn) + 2 * tokens * dim * hidden


def block_params(dim: int, mlp_ratio: float, qkv_bias: bool = True, share_attn: bool = False) -> int:
    hidden = int(dim * mlp_ratio)
    return 4 * dim + attention_params(dim, qkv_bias, share_attn) + 2 * dim * hidden + hidden + dim
