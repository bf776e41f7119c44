"""CrossViT (Chen et al., ICCV 2021, arXiv 2103.14899): branches of different patch sizes and widths, fused by
cross-attention between their class tokens.

Each of the K multi-scale encoders runs N blocks in the small-patch branch and M blocks in the large-patch branch,
then L cross-attention fusions: the class token of one branch is projected to the width of the other, attends to
that branch's patch tokens, and is projected back. Any number of branches >= 2 is supported (branch i visits
branch i + 1, cyclically). At the paper's configs the model is state-dict compatible with timm's ``crossvit_*``
models and gives the same logits.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models.vision_transformer import init_weights_vit_timm
from torch import nn

from ..config import ModelConfig, register_family, register_preset
from .layers import Block, LayerNorm, attention_params, block_flops, block_params, ln_flops
from .pretrained import TimmModel

# The three-conv ("dagger") patch embedding: a 7x7 stride-4 conv, then two 3x3 convs with these strides. The paper
# has 12 and 16; 4 and 8 drop strides so that small images can use it too.
DAGGER_STRIDES = {4: (1, 1), 8: (2, 1), 12: (3, 1), 16: (2, 2)}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CrossViTConfig(ModelConfig):
    """A multi-branch CrossViT; per-branch fields list branch 0 (small patches) first. Defaults: CrossViT-S."""

    family: ClassVar[str] = "crossvit"
    img_size: int = 240  # the input image; each branch resizes it (bicubic) to its own `branch_img_size`
    branch_img_size: tuple[int, ...] = (240, 224)  # the paper's large branch sees 224px: 14x14 patches of 16
    patch_size: tuple[int, ...] = (12, 16)
    embed_dim: tuple[int, ...] = (192, 384)
    depth: tuple[int, ...] = (1, 4)  # blocks per branch in each encoder: the paper's N and M
    num_heads: tuple[int, ...] = (6, 6)
    mlp_ratio: tuple[float, ...] = (4.0, 4.0)
    num_encoders: int = 3  # the paper's K
    num_fusions: int = 1  # the paper's L; as in the reference code, only the first fusion sees patch tokens
    multi_conv: bool = False  # the paper's dagger: three-conv patch embedding (patch sizes 4, 8, 12, 16)
    qkv_bias: bool = True
    drop_path_rate: float = 0.0  # training regulariser; no effect on cost

    def validate(self) -> None:
        n = len(self.patch_size)
        if n < 2:
            raise ValueError(f"`patch_size` must list at least 2 branches, got {list(self.patch_size)}")
        for name in ("branch_img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
            values = getattr(self, name)
            if len(values) != n:
                raise ValueError(f"`{name}` must have one entry per branch ({n}, as `patch_size`), got {list(values)}")
            ok = (lambda v: _is_int(v) or isinstance(v, float)) if name == "mlp_ratio" else _is_int
            if not all(ok(v) and v > 0 for v in values):
                raise ValueError(f"`{name}` entries must be positive {'numbers' if name == 'mlp_ratio' else 'integers'}"
                                 f", got {list(values)}")
        branches = zip(self.branch_img_size, self.patch_size, self.embed_dim, self.num_heads, strict=True)
        for i, (size, patch, dim, heads) in enumerate(branches):
            if size % patch:
                raise ValueError(f"`patch_size` {patch} of branch {i} must divide its `branch_img_size` {size}")
            if dim % heads:
                raise ValueError(f"`embed_dim` {dim} of branch {i} must be divisible by its `num_heads` {heads}")
            if self.multi_conv and (patch not in DAGGER_STRIDES or dim < 4):
                raise ValueError(f"`multi_conv` needs `patch_size` in {sorted(DAGGER_STRIDES)} and `embed_dim` >= 4, "
                                 f"got {patch} and {dim} in branch {i}")
        for name in ("num_encoders", "num_fusions"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"`drop_path_rate` must be in [0, 1), got {self.drop_path_rate}")

    @property
    def num_branches(self) -> int:
        return len(self.patch_size)

    @property
    def num_patches(self) -> tuple[int, ...]:
        return tuple((s // p) ** 2 for s, p in zip(self.branch_img_size, self.patch_size, strict=True))

    def _visits(self) -> list[tuple[int, int]]:
        """(branch, the branch its class token visits) for each fusion."""
        return [(i, (i + 1) % self.num_branches) for i in range(self.num_branches)]

    def tokens_per_block(self) -> dict[str, tuple[int, ...]]:
        names = ("small", "large") if self.num_branches == 2 else [f"branch{i}" for i in range(self.num_branches)]
        blocks = [d * self.num_encoders for d in self.depth]
        return {name: (n + 1,) * b for name, n, b in zip(names, self.num_patches, blocks, strict=True)}

    def _embed_flops(self, i: int) -> int:
        size, patch, D, C = self.branch_img_size[i], self.patch_size[i], self.embed_dim[i], self.in_chans
        resize = 16 * C * size**2 if size != self.img_size else 0  # bicubic: 16 taps per output pixel
        if not self.multi_conv:
            return resize + (size // patch) ** 2 * D * C * patch**2
        s2, s3 = DAGGER_STRIDES[patch]
        h1, h2, h3 = size // 4, size // (4 * s2), size // patch
        return resize + h1**2 * (D // 4) * C * 49 + h2**2 * (D // 2) * (D // 4) * 9 + h3**2 * D * (D // 2) * 9

    def flops_by_module(self) -> dict[str, int]:
        dims, L = self.embed_dim, self.num_fusions
        tokens = [n + 1 for n in self.num_patches]
        flops = {f"patch_embed.{i}": self._embed_flops(i) for i in range(self.num_branches)}
        encoder = sum(self.depth[i] * block_flops(tokens[i], dims[i], self.mlp_ratio[i]) for i in range(len(dims)))
        for i, j in self._visits():
            Di, Dj, T = dims[i], dims[j], tokens[j]
            encoder += ln_flops(1, Di) + Di * Dj  # projection of the class token to the visited width
            encoder += ln_flops(T, Dj) + 2 * Dj * Dj + 2 * T * Dj * Dj + 2 * T * Dj  # q, proj; k, v; QK^T, AV
            encoder += (L - 1) * (ln_flops(1, Dj) + 4 * Dj * Dj + 2 * Dj)  # further fusions see the class token only
            encoder += ln_flops(1, Dj) + Dj * Di  # projection back
        flops.update({f"blocks.{k}": encoder for k in range(self.num_encoders)})
        flops.update({f"norm.{i}": ln_flops(t, D) for i, (t, D) in enumerate(zip(tokens, dims, strict=True))})
        flops.update({f"head.{i}": D * self.num_classes for i, D in enumerate(dims)})
        return flops

    def num_params(self) -> int:
        dims, C = self.embed_dim, self.in_chans
        total = 0
        for D, n, p in zip(dims, self.num_patches, self.patch_size, strict=True):
            if self.multi_conv:
                D4, D2 = D // 4, D // 2
                total += C * 49 * D4 + D4 + D4 * 9 * D2 + D2 + D2 * 9 * D + D
            else:
                total += C * p**2 * D + D
            total += D + (n + 1) * D  # class token, positional embedding
            total += 2 * D + D * self.num_classes + self.num_classes  # final norm and head
        encoder = sum(self.depth[i] * block_params(dims[i], self.mlp_ratio[i], self.qkv_bias) for i in range(len(dims)))
        for i, j in self._visits():
            Di, Dj = dims[i], dims[j]
            encoder += 2 * Di + Di * Dj + Dj  # norm, act, linear
            encoder += self.num_fusions * (2 * Dj + attention_params(Dj, self.qkv_bias))  # norm, wq/wk/wv, proj
            encoder += 2 * Dj + Dj * Di + Di
        return total + self.num_encoders * encoder


class BranchEmbed(nn.Module):
    """Resizes the image to the branch's input size, then cuts it into patches (one conv or the dagger's three)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, multi_conv: bool = False) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        if multi_conv:
            s2, s3 = DAGGER_STRIDES[patch_size]
            D4, D2 = embed_dim // 4, embed_dim // 2
            self.proj = nn.Sequential(
                nn.Conv2d(in_chans, D4, 7, stride=4, padding=3), nn.ReLU(inplace=True),
                nn.Conv2d(D4, D2, 3, stride=s2, padding=0 if s2 == 3 else 1), nn.ReLU(inplace=True),
                nn.Conv2d(D2, embed_dim, 3, stride=s3, padding=1),
            )
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != self.img_size:
            x = F.interpolate(x, size=self.img_size, mode="bicubic", align_corners=False)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class CrossAttention(nn.Module):
    """Attention with one query, the class token (token 0), over all tokens (CrossViT eq. 5); fused SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.wq(x[:, :1]).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, 1, hd)
        k = self.wk(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, N, hd)
        v = self.wv(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, nh, 1, hd)
        return self.proj(x.transpose(1, 2).reshape(B, 1, C))  # (B, 1, C)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention with a residual on the class token; returns the class token alone."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, drop_path: float = 0.0,
                 norm_layer: type[nn.Module] = LayerNorm) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = CrossAttention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] + self.drop_path(self.attn(self.norm1(x)))


class MultiScaleEncoder(nn.Module):
    """One of the K encoders: per-branch blocks, then each class token visits the next branch and comes back.

    Module names follow timm's ``MultiScaleBlock`` (``blocks``, ``projs``, ``fusion``, ``revert_projs``).
    """

    def __init__(self, config: CrossViTConfig, drop_path: list[float], norm_layer: type[nn.Module] = LayerNorm,
                 act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        c, dims = config, config.embed_dim
        self.visits = c._visits()
        self.blocks = nn.ModuleList(
            nn.ModuleList(Block(D, h, r, c.qkv_bias, drop_path=drop_path[b], norm_layer=norm_layer) for b in range(d))
            for D, h, r, d in zip(dims, c.num_heads, c.mlp_ratio, c.depth, strict=True)
        )

        def projection(dim_in: int, dim_out: int) -> nn.Module:
            return nn.Sequential(norm_layer(dim_in), act_layer(), nn.Linear(dim_in, dim_out))

        def fusion(j: int) -> nn.Module:
            make = partial(CrossAttentionBlock, dims[j], c.num_heads[j], c.qkv_bias, drop_path[-1], norm_layer)
            # One fusion is a bare block and several a Sequential, as in timm's state dicts. In a Sequential each
            # block returns the class token alone, so later fusions refine it without the patch tokens.
            return make() if c.num_fusions == 1 else nn.Sequential(*(make() for _ in range(c.num_fusions)))

        self.projs = nn.ModuleList(projection(dims[i], dims[j]) for i, j in self.visits)
        self.fusion = nn.ModuleList(fusion(j) for _, j in self.visits)
        self.revert_projs = nn.ModuleList(projection(dims[j], dims[i]) for i, j in self.visits)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = list(xs)
        for i, blocks in enumerate(self.blocks):
            for block in blocks:
                xs[i] = block(xs[i])[0]  # (B, 1 + N_i, D_i)
        out = []
        for i, j in self.visits:
            cls = self.projs[i](xs[i][:, :1])  # (B, 1, D_j)
            cls = self.fusion[i](torch.cat([cls, xs[j][:, 1:]], dim=1))
            out.append(torch.cat([self.revert_projs[i](cls), xs[i][:, 1:]], dim=1))
        return out


class CrossViT(TimmModel, nn.Module):
    """Multi-branch ViT; ``forward_features`` returns one token tensor per branch, the head averages their logits."""

    def __init__(self, config: CrossViTConfig, norm_layer: type[nn.Module] = LayerNorm) -> None:
        super().__init__()
        self.config = c = config
        dims = c.embed_dim
        self.num_classes = c.num_classes
        self.num_features = sum(dims)
        # timm's names (and order), one parameter per branch, so that its state dicts load unchanged.
        for i, (D, n) in enumerate(zip(dims, c.num_patches, strict=True)):
            self.register_parameter(f"pos_embed_{i}", nn.Parameter(torch.zeros(1, 1 + n, D)))
            self.register_parameter(f"cls_token_{i}", nn.Parameter(torch.zeros(1, 1, D)))
        self.patch_embed = nn.ModuleList(
            BranchEmbed(c.branch_img_size[i], c.patch_size[i], c.in_chans, dims[i], c.multi_conv)
            for i in range(c.num_branches)
        )
        # Stochastic depth grows over the encoders; a fusion takes the rate of its encoder's last block (timm).
        blocks_per_encoder = max(c.depth)
        rates = torch.linspace(0, c.drop_path_rate, c.num_encoders * blocks_per_encoder).tolist()
        self.blocks = nn.ModuleList(
            MultiScaleEncoder(c, rates[k * blocks_per_encoder : (k + 1) * blocks_per_encoder], norm_layer)
            for k in range(c.num_encoders)
        )
        self.norm = nn.ModuleList(norm_layer(D) for D in dims)
        self.head = nn.ModuleList(nn.Linear(D, c.num_classes) for D in dims)
        for i in range(c.num_branches):
            trunc_normal_(getattr(self, f"cls_token_{i}"), std=0.02)
            trunc_normal_(getattr(self, f"pos_embed_{i}"), std=0.02)
        for module in self.modules():
            init_weights_vit_timm(module)
        self.init_pretrained_cfg()

    @classmethod
    def timm_layers(cls, config: CrossViTConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
        stem = ".proj.0" if config.multi_conv else ".proj"
        return (tuple(f"patch_embed.{i}{stem}" for i in range(config.num_branches)),
                tuple(f"head.{i}" for i in range(config.num_branches)))

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        xs = []
        for i, embed in enumerate(self.patch_embed):
            tokens = embed(x)  # (B, N_i, D_i)
            cls = getattr(self, f"cls_token_{i}").expand(tokens.shape[0], -1, -1)
            xs.append(torch.cat([cls, tokens], dim=1) + getattr(self, f"pos_embed_{i}"))
        for encoder in self.blocks:
            xs = encoder(xs)
        return [norm(x) for norm, x in zip(self.norm, xs, strict=True)]

    def forward_head(self, xs: list[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        cls = [x[:, 0] for x in xs]
        if pre_logits or not self.num_classes:  # no classifier (reset_classifier(0)): the branches' features
            return torch.cat(cls, dim=1)
        return torch.stack([head(t) for head, t in zip(self.head, cls, strict=True)]).mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


register_family(CrossViTConfig, CrossViT)

# The paper's models take 240px images: the small branch cuts them into 20x20 patches of 12, the large branch
# resizes them to 224px, 14x14 patches of 16 (timm's `crossvit_*_240`). The paper's table is counted there, with
# QK^T and AV: at 240px for both branches every model would be 12-16% over it, without QK^T and AV 5-17% under.
_PAPER = dict(img_size=240, branch_img_size=(240, 224), patch_size=(12, 16), num_encoders=3, num_fusions=1)
_CONVENTION = "at 240px, large branch resized to 224px"

for _name, _dim, _heads, _depth, _ratio, _dagger, _doc in [
    ("crossvit_tiny", 96, 3, 4, 4.0, False,
     "CrossViT-Ti (Chen et al. 2021): paper 6.9M params, 1.6G MACs; here 7.01M, 1.57G"),
    ("crossvit_small", 192, 6, 4, 4.0, False, "CrossViT-S: paper 26.7M params, 5.6G MACs; here 26.86M, 5.63G"),
    ("crossvit_base", 384, 12, 4, 4.0, False, "CrossViT-B: paper 104.7M params, 21.2G MACs; here 105.03M, 21.22G"),
    ("crossvit_9", 128, 4, 3, 3.0, False, "CrossViT-9: paper 8.6M params, 1.8G MACs; here 8.55M, 1.85G"),
    ("crossvit_15", 192, 6, 5, 3.0, False, "CrossViT-15: paper 27.4M params, 5.8G MACs; here 27.53M, 5.81G"),
    ("crossvit_18", 224, 7, 6, 3.0, False, "CrossViT-18: paper 43.3M params, 9.0G MACs; here 43.27M, 9.06G"),
    ("crossvit_9_dagger", 128, 4, 3, 3.0, True,
     "CrossViT-9\u2020, three-conv patch embedding: paper 8.8M params, 2.0G MACs; here 8.78M, 1.99G"),
    ("crossvit_15_dagger", 192, 6, 5, 3.0, True,
     "CrossViT-15\u2020: paper 28.2M params, 6.1G MACs; here 28.21M, 6.13G"),
    ("crossvit_18_dagger", 224, 7, 6, 3.0, True,
     "CrossViT-18\u2020: paper 44.3M params, 9.5G MACs; here 44.27M, 9.50G"),
]:
    _config = CrossViTConfig(**_PAPER, embed_dim=(_dim, 2 * _dim), num_heads=(_heads, _heads), depth=(1, _depth),
                             mlp_ratio=(_ratio, _ratio), multi_conv=_dagger)
    register_preset(_name, _config, f"{_doc} ({_CONVENTION}).")
