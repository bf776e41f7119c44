"""ScheduleViT: one isotropic ViT whose config fixes the token schedule block by block.

It covers DeiT (no pooling, no sharing), HVT (Pan et al., ICCV 2021: 1D max pooling of the sequence,
no class token, a fresh positional embedding per stage, average-pooled head), PSViT (Chen et al.
2021, arXiv 2108.03428: spatial token pooling on the token grid plus attention sharing between
neighbouring blocks), and token reduction inside the blocks: merging (ToMe, Bolya et al. ICLR 2023),
pruning with fusion of the inattentive tokens (EViT, Liang et al. ICLR 2022), or pruning then merging
(DiffRate, Chen et al. ICCV 2023). With an identity
schedule it is state-dict compatible with timm's ``VisionTransformer`` and gives the same logits.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import init_weights_vit_timm
from torch import nn

from ..config import ModelConfig, register_family, register_preset
from .layers import (
    POOL_KINDS,
    REDUCE_KINDS,
    Block,
    LayerNorm,
    TokenDrop,
    TokenMerge,
    TokenPool,
    TokenPrune,
    TokenPruneMerge,
    block_flops,
    block_params,
    check_trunk,
    drop_flops,
    ln_flops,
    pooled_length,
    reduction_flops,
)
from .pretrained import TimmModel


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleViTConfig(ModelConfig):
    """A ViT with a per-block token schedule (DeiT, HVT, PSViT, ToMe, EViT, DiffRate)."""

    family: ClassVar[str] = "schedule_vit"
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True  # False: no class token and an average-pooled head (HVT)
    pool_kind: str = "max1d"  # max1d: HVT's sequence pooling; max2d/avg2d/conv2d: PSViT's grid pooling
    pool_after: tuple[int, ...] = ()  # blocks after which the patch tokens are pooled
    stage_pos_embed: bool = False  # HVT: a fresh learned positional embedding after each pooling
    share_attn: tuple[int, ...] = ()  # blocks that reuse the attention map of the block before them
    # Patch tokens (class token excluded) leaving each block; () keeps them all. Block b reduces inside itself,
    # after attention and before the MLP, when its entry is lower than what enters it. Excludes `pool_after`.
    keep_tokens: tuple[int, ...] = ()
    # merge: ToMe's bipartite soft matching; prune: EViT's top-k with a fused token; prune_merge: DiffRate's
    # pruning (top-k by class attention, no fused token) to `prune_tokens`, then ToMe's merging to `keep_tokens`
    reduce_kind: str = "merge"
    prune_tokens: tuple[int, ...] = ()  # prune_merge only: patch tokens left after block b's pruning step
    drop_path_rate: float = 0.0  # training regulariser; no effect on cost

    def validate(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"`patch_size` ({self.patch_size}) must divide `img_size` ({self.img_size})")
        check_trunk(self)
        if self.pool_kind not in POOL_KINDS:
            raise ValueError(f"`pool_kind` must be one of {', '.join(POOL_KINDS)}, got {self.pool_kind!r}")
        if list(self.pool_after) != sorted(set(self.pool_after)) or any(
            not 0 <= b <= self.depth - 2 for b in self.pool_after
        ):
            raise ValueError(f"`pool_after` must be increasing block indices in 0..{self.depth - 2}, "
                             f"got {list(self.pool_after)}")
        if list(self.share_attn) != sorted(set(self.share_attn)) or any(
            not 1 <= b <= self.depth - 1 for b in self.share_attn
        ):
            raise ValueError(f"`share_attn` must be increasing block indices in 1..{self.depth - 1}, "
                             f"got {list(self.share_attn)}")
        self._validate_keep_tokens()
        tokens = self.tokens_per_block()["tokens"]  # raises if a pooling runs out of tokens
        for b in self.share_attn:
            if tokens[b] != tokens[b - 1]:
                raise ValueError(f"`share_attn`: block {b} sees {tokens[b]} tokens but block {b - 1} sees "
                                 f"{tokens[b - 1]}; only blocks that see the same tokens can share attention")

    def _validate_keep_tokens(self) -> None:
        if self.reduce_kind not in REDUCE_KINDS:
            raise ValueError(f"`reduce_kind` must be one of {', '.join(REDUCE_KINDS)}, got {self.reduce_kind!r}")
        keep, prune_merge = self.keep_tokens, self.reduce_kind == "prune_merge"
        if self.prune_tokens and not (prune_merge and keep):
            raise ValueError("`prune_tokens` is only used with `reduce_kind` prune_merge and `keep_tokens` set; it "
                             f"must be empty otherwise, got {list(self.prune_tokens)}")
        if not keep:
            return
        if len(keep) != self.depth:
            raise ValueError(f"`keep_tokens` must have one entry per block (`depth` = {self.depth}), got {len(keep)}")
        if prune_merge and len(self.prune_tokens) != self.depth:
            raise ValueError(f"`prune_tokens` must have one entry per block (`depth` = {self.depth}) with "
                             f"`reduce_kind` prune_merge, got {len(self.prune_tokens)}")
        if self.pool_after:
            raise ValueError("`keep_tokens` and `pool_after` cannot both be set: a schedule either pools between "
                             "blocks or merges/prunes inside them")
        n = self.grid**2
        for b, k in enumerate(keep):
            if k < 1:
                raise ValueError(f"`keep_tokens`: block {b} keeps {k} patch tokens; every block keeps at least 1")
            if k > n:
                raise ValueError(f"`keep_tokens`: block {b} keeps {k} of {n} patch tokens; the schedule must be "
                                 f"non-increasing and within the {self.grid**2} patch tokens, got {list(keep)}")
            pruned = self.prune_tokens[b] if prune_merge else n  # what the merging step starts from
            if pruned > n:
                raise ValueError(f"`prune_tokens`: block {b} prunes to {pruned} of the {n} patch tokens entering it; "
                                 "pruning cannot add tokens")
            if pruned < k:
                raise ValueError(f"`prune_tokens`: block {b} prunes to {pruned} patch tokens but `keep_tokens` keeps "
                                 f"{k}; merging cannot add tokens (keep_tokens[b] <= prune_tokens[b])")
            if k < n and b in self.share_attn:
                raise ValueError(f"`keep_tokens`: block {b} reduces {n} to {k} patch tokens but is in `share_attn`; "
                                 "a block that reuses the previous map has no queries and keys of its own")
            if self.reduce_kind == "merge" and n - k > (n + 1) // 2:
                raise ValueError(f"`keep_tokens`: block {b} keeps {k} of {n} patch tokens, but merging removes at "
                                 f"most {(n + 1) // 2} per block (bipartite matching)")
            if prune_merge and pruned - k > (pruned + 1) // 2:
                raise ValueError(f"`keep_tokens`: block {b} merges its {pruned} pruned patch tokens to {k}, but "
                                 f"merging removes at most {(pruned + 1) // 2} per block (bipartite matching)")
            n = k

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def _schedule(self) -> list[tuple[int, tuple[int, int]]]:
        """(patch tokens, grid) seen by each block."""
        n, grid = self.grid**2, (self.grid, self.grid)
        out = []
        for b in range(self.depth):
            out.append((n, grid))
            if self.keep_tokens:
                n, grid = self.keep_tokens[b], (0, 0)  # merged or pruned tokens no longer form a grid
            if b in self.pool_after:
                min_tokens = 3 if self.pool_kind == "max1d" else 2
                if n < min_tokens:
                    raise ValueError(f"`pool_after`: block {b} has {n} patch tokens left, too few to pool "
                                     f"with {self.pool_kind}")
                n, grid = pooled_length(self.pool_kind, n, grid)
        return out

    def tokens_per_block(self) -> dict[str, tuple[int, ...]]:
        prefix = int(self.class_token)
        return {"tokens": tuple(n + prefix for n, _ in self._schedule())}

    def flops_by_module(self) -> dict[str, int]:
        D, prefix = self.embed_dim, int(self.class_token)
        flops = {"patch_embed": self.grid**2 * D * self.in_chans * self.patch_size**2}
        schedule = self._schedule()
        for b, (n, _) in enumerate(schedule):
            keep = self.keep_tokens[b] if self.keep_tokens else n
            flops[f"blocks.{b}"] = block_flops(n + prefix, D, self.mlp_ratio, b in self.share_attn, keep + prefix)
            if self.reduce_kind == "prune_merge":
                pruned = self.prune_tokens[b] if self.prune_tokens else n
                flops[f"blocks.{b}"] += (drop_flops(n, pruned, prefix, D)
                                         + reduction_flops("merge", pruned, keep, prefix, D, self.num_heads))
            else:
                flops[f"blocks.{b}"] += reduction_flops(self.reduce_kind, n, keep, prefix, D, self.num_heads)
            if b in self.pool_after:
                pooled = schedule[b + 1][0]
                flops[f"token_pools.{b}"] = pooled * D * 9 if self.pool_kind == "conv2d" else 0
        flops["norm"] = ln_flops((self.keep_tokens or (schedule[-1][0],))[-1] + prefix, D)
        flops["head"] = D * self.num_classes
        return flops

    def num_params(self) -> int:
        D, prefix = self.embed_dim, int(self.class_token)
        schedule = self._schedule()
        total = self.in_chans * self.patch_size**2 * D + D  # patch embedding conv
        total += prefix * D + (self.grid**2 + prefix) * D  # class token, positional embedding
        total += sum(block_params(D, self.mlp_ratio, self.qkv_bias, b in self.share_attn) for b in range(self.depth))
        for b in self.pool_after:
            total += 10 * D if self.pool_kind == "conv2d" else 0
            total += (schedule[b + 1][0] + prefix) * D if self.stage_pos_embed else 0
        return total + 2 * D + D * self.num_classes + self.num_classes


def block_reduction(config: ScheduleViTConfig, b: int, patch_tokens: int) -> nn.Module | None:
    """The weightless reduction block ``b`` runs on the ``patch_tokens`` entering it; None when it removes none.
    A prune_merge block runs only the steps that remove tokens, so that with nothing pruned it is a merge block."""
    keep = config.keep_tokens[b] if config.keep_tokens else patch_tokens
    if keep >= patch_tokens:
        return None
    prefix, scale = int(config.class_token), (config.embed_dim // config.num_heads) ** -0.5
    if config.reduce_kind == "merge":
        return TokenMerge(keep, prefix)
    if config.reduce_kind == "prune":
        return TokenPrune(keep, prefix, scale)
    pruned = config.prune_tokens[b]
    if pruned == patch_tokens:
        return TokenMerge(keep, prefix)
    return TokenDrop(pruned, prefix, scale) if keep == pruned else TokenPruneMerge(pruned, keep, prefix, scale)


class ScheduleViT(TimmModel, nn.Module):
    """Isotropic ViT; the token schedule (pooling, merging/pruning, attention sharing) lives in ``forward_features``
    (merging and pruning run inside the blocks, as weightless ``Block.reduction`` modules)."""

    def __init__(self, config: ScheduleViTConfig, norm_layer: type[nn.Module] | None = None) -> None:
        super().__init__()
        self.config = c = config
        norm_layer = norm_layer or LayerNorm
        D = c.embed_dim
        self.num_classes = c.num_classes
        self.num_prefix_tokens = int(c.class_token)
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if c.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, c.grid**2 + self.num_prefix_tokens, D))
        drop_path = torch.linspace(0, c.drop_path_rate, c.depth, device="cpu").tolist()  # also under a meta device
        schedule = c._schedule()
        self.blocks = nn.ModuleList(
            Block(D, c.num_heads, c.mlp_ratio, c.qkv_bias, share_attn=b in c.share_attn, drop_path=drop_path[b],
                  norm_layer=norm_layer, reduction=block_reduction(c, b, schedule[b][0]))
            for b in range(c.depth)
        )
        self.token_pools = nn.ModuleDict({
            str(b): TokenPool(c.pool_kind, D, self.num_prefix_tokens, schedule[b][1],
                              pos_tokens=(schedule[b + 1][0] + self.num_prefix_tokens) if c.stage_pos_embed else 0)
            for b in c.pool_after
        })
        # Blocks whose attention map the next block reuses must materialise it.
        self.hands_on_attn = [b + 1 in c.share_attn for b in range(c.depth)]
        # HVT's own code normalises every token and then averages (timm's ``fc_norm=False``); its PaddleViT
        # port and timm's default average head do the reverse, a different function.
        self.norm = norm_layer(D)
        self.head = nn.Linear(D, c.num_classes)
        if self.pos_embed.device.type != "meta":  # a supernet's child (supernet.py) takes its weights from the parent
            trunc_normal_(self.pos_embed, std=0.02)
            if self.cls_token is not None:
                nn.init.normal_(self.cls_token, std=1e-6)
            for module in self.modules():
                init_weights_vit_timm(module)
        self.init_pretrained_cfg()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        attn = size = None  # size: patches per token once merging has begun (B, N, 1)
        for b, block in enumerate(self.blocks):
            x, attn, size = block(x, attn, self.hands_on_attn[b], size)
            if str(b) in self.token_pools:
                x = self.token_pools[str(b)](x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


register_family(ScheduleViTConfig, ScheduleViT)

_TINY = dict(embed_dim=192, num_heads=3)
_SMALL = dict(embed_dim=384, num_heads=6)
_BASE = dict(embed_dim=768, num_heads=12)
_HVT = dict(class_token=False, pool_kind="max1d", stage_pos_embed=True)

for _name, _args, _doc in [
    ("deit_tiny", _TINY, "DeiT-Ti (Touvron et al. 2021): 5.7M params, 1.3G MACs."),
    ("deit_small", _SMALL, "DeiT-S: 22.05M params, 4.6G MACs."),
    ("deit_base", _BASE, "DeiT-B: 86.6M params, 17.6G MACs."),
    ("hvt_ti_1", {**_TINY, **_HVT, "pool_after": (0,)}, "HVT-Ti-1 (Pan et al. 2021): 5.74M params, 0.64G MACs."),
    ("hvt_s_0", {**_SMALL, **_HVT}, "HVT-S-0: DeiT-S without class token, average head, no pooling; 4.57G."),
    ("hvt_s_1", {**_SMALL, **_HVT, "pool_after": (0,)}, "HVT-S-1: one pooling stage; 22.09M params, 2.40G."),
    ("hvt_s_2", {**_SMALL, **_HVT, "pool_after": (0, 6)}, "HVT-S-2: two pooling stages; 22.11M, 1.94G."),
    ("hvt_s_3", {**_SMALL, **_HVT, "pool_after": (0, 4, 8)}, "HVT-S-3: three pooling stages; 22.13M, 1.62G."),
    ("hvt_s_4", {**_SMALL, **_HVT, "pool_after": (0, 3, 6, 9)}, "HVT-S-4: four pooling stages; 22.14M, 1.39G."),
    ("psvit_2d_tiny", {**_TINY, "pool_kind": "max2d", "pool_after": (3, 7), "share_attn": (2, 5, 7, 9, 11)},
     "PSViT-style tiny: reproduces PSViT's two mechanisms at DeiT-Ti width, 2D max pooling of the 14x14 token grid "
     "after blocks 3 and 7 (196 -> 49 -> 16 patch tokens) and attention sharing on blocks 2, 5, 7, 9 and 11. Not "
     "the paper's searched architecture: its table could not be consulted, so no published figure is claimed."),
    ("psvit_2d_small", {**_SMALL, "pool_kind": "max2d", "pool_after": (3, 7), "share_attn": (2, 5, 7, 9, 11)},
     "PSViT-style small: the schedule of psvit_2d_tiny at DeiT-S width; mechanism only, no published figure claimed."),
    ("psvit_conv_small", {**_SMALL, "pool_kind": "conv2d", "pool_after": (3, 7), "share_attn": (1, 3, 5, 7, 9, 11)},
     "PSViT-style small with a learned strided depthwise-conv pooling and sharing in every second block of each "
     "stage; mechanism only, no published figure claimed."),
    ("deit_tiny_tome", {**_TINY, "reduce_kind": "merge", "keep_tokens": tuple(196 - 8 * (b + 1) for b in range(12))},
     "ToMe-style DeiT-Ti (Bolya et al. 2023): DeiT-Ti weights unchanged, bipartite soft matching merges r=8 patch "
     "tokens in every block (196 -> 100), proportional attention; 5.72M params, 0.93G MACs by our count (DeiT-Ti: "
     "1.26G). Mechanism and schedule only; no published figure claimed."),
    ("deit_tiny_evit", {**_TINY, "reduce_kind": "prune",
                        "keep_tokens": (196,) * 3 + (137,) * 3 + (96,) * 3 + (67,) * 3},
     "EViT-style DeiT-Ti (Liang et al. 2022): keep rate 0.7 in blocks 3, 6 and 9 (0-based; 196 -> 137 -> 96 -> 67 "
     "patch tokens, the last one the fused inattentive tokens); 5.72M params, 0.81G MACs by our count. The same "
     "schedule at DeiT-S width counts 2.99G, the 3.0G EViT prints for DeiT-S at keep rate 0.7."),
]:
    register_preset(_name, ScheduleViTConfig(**_args), _doc)
