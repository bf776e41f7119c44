"""``tokennas.patch``: run a token schedule on a user's own timm ViT, in place.

ToMe's convention (Bolya et al., ICLR 2023: ``tome.patch.timm(model); model.r = 8``): the model keeps its weights
and its state-dict names, and its blocks run the schedule of a ``ScheduleViTConfig``: per-block merging (ToMe),
pruning (EViT), pruning then merging (DiffRate) and attention sharing (PSViT). Each timm block becomes a tokennas
``Block`` made of the timm block's own modules (the same ``Parameter`` objects, nothing is copied); a block that
reuses the previous attention map keeps timm's ``qkv`` and uses its value third. ``model.blocks`` becomes a
``ScheduledBlocks``, which hands the attention maps and the token sizes from block to block; everything else
(patch embedding, positional embedding, final norm, pooling, head) is timm's. Patching a patched model applies
the new schedule. Between-block pooling (``pool_after``) is not supported, nor are timm's gradient checkpointing
and ``forward_intermediates`` on a patched model.

    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    tokennas.patch(model, "results/run/best/01-trial7.yaml")
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .config import ModelConfig, load_config
from .models.layers import Attention, Block
from .models.schedule_vit import ScheduleViTConfig, block_reduction


class ScheduledBlocks(nn.ModuleList):
    """A patched model's ``blocks``: tokennas blocks run in order, each handing its attention map to a next block
    that shares it and the token sizes (ToMe's proportional attention) to the next; indexed as timm's blocks."""

    def __init__(self, blocks: list[Block], schedule: ScheduleViTConfig) -> None:
        super().__init__(blocks)
        self.schedule = schedule
        self.hands_on_attn = [b + 1 in schedule.share_attn for b in range(len(blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = size = None
        for block, hand_on in zip(self, self.hands_on_attn, strict=True):
            x, attn, size = block(x, attn, hand_on, size)
        return x


def patch(model: VisionTransformer, schedule: ScheduleViTConfig | str | Path) -> VisionTransformer:
    """Make ``model`` (a timm ``VisionTransformer``) run ``schedule`` (a ``ScheduleViTConfig``, or a .yaml/.json file
    or preset name for one) in place, with its own weights; returns ``model``. Raises ``ValueError`` naming the first
    way the schedule does not fit the model. The identity schedule leaves the logits unchanged."""
    config = load_config(schedule)
    check_compatible(model, config)
    prefix = int(config.class_token)
    entering = [t - prefix for t in config.tokens_per_block()["tokens"]]  # patch tokens entering each block
    blocks = [_borrow(source, config, b, entering[b]) for b, source in enumerate(model.blocks)]
    model.blocks = ScheduledBlocks(blocks, config).train(model.training)  # new modules start in training mode
    return model


def _borrow(source: nn.Module, config: ScheduleViTConfig, b: int, patch_tokens: int) -> Block:
    """A tokennas ``Block`` running on ``source``'s modules (a timm block, or a block of an earlier patch)."""
    share = b in config.share_attn
    with torch.device("meta"):  # its own layers are replaced below
        block = Block(config.embed_dim, config.num_heads, share_attn=share,
                      reduction=block_reduction(config, b, patch_tokens))
        block.attn = Attention(config.embed_dim, config.num_heads, share_attn=share, value_from_qkv=True)
    for name in ("norm1", "drop_path1", "norm2", "mlp", "drop_path2"):
        setattr(block, name, getattr(source, name))
    for name in ("qkv", "proj", "proj_drop"):
        setattr(block.attn, name, getattr(source.attn, name))
    attn_drop = source.attn.attn_drop  # timm: a Dropout; tokennas: its rate
    block.attn.attn_drop = attn_drop.p if isinstance(attn_drop, nn.Dropout) else attn_drop
    return block


def check_compatible(model: nn.Module, config: ModelConfig) -> None:
    """Raise ``ValueError`` naming the first mismatch between a timm ViT and a schedule; see ``patch``."""
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"patch takes a timm VisionTransformer, got {type(model).__name__}")
    if not isinstance(config, ScheduleViTConfig):
        raise ValueError(f"patch runs schedule_vit schedules, got a {config.family} config")
    if config.pool_after:
        raise ValueError(f"`pool_after` is not supported by patch (pooling between blocks), got "
                         f"{list(config.pool_after)}; use keep_tokens with merge, prune or prune_merge")
    blocks = list(model.blocks)
    if config.depth != len(blocks):
        raise ValueError(f"`depth`: the schedule has {config.depth} blocks, the model {len(blocks)}")
    for b, block in enumerate(blocks):
        if not _plain(block):
            raise ValueError(f"block {b} is a {type(block).__name__} with a {type(block.attn).__name__}; patch "
                             "supports timm's pre-norm Block with its plain Attention (no layer scale, QK norm, "
                             "attention norm or gate)")
    attn, mlp = blocks[0].attn, blocks[0].mlp
    fields = [("embed_dim", config.embed_dim, model.embed_dim), ("num_heads", config.num_heads, attn.num_heads),
              ("qkv_bias", config.qkv_bias, attn.qkv.bias is not None),
              ("mlp hidden units", int(config.embed_dim * config.mlp_ratio),
               getattr(getattr(mlp, "fc1", None), "out_features", None))]
    for name, want, have in fields:
        if want != have:
            raise ValueError(f"`{name}`: the schedule has {want}, the model {have}")
    grid, patch_size = tuple(model.patch_embed.grid_size), tuple(model.patch_embed.patch_size)
    if grid != (config.grid, config.grid) or patch_size != (config.patch_size, config.patch_size):
        raise ValueError(f"patch grid: the schedule's is {config.grid}x{config.grid} of {config.patch_size}px "
                         f"patches (`img_size` {config.img_size}, `patch_size` {config.patch_size}), the model's "
                         f"patch_embed makes {grid[0]}x{grid[1]} of {patch_size[0]}x{patch_size[1]}px")
    if model.dynamic_img_size or not isinstance(model.patch_drop, nn.Identity):
        raise ValueError("`dynamic_img_size`/`patch_drop_rate`: the model's token count varies; a schedule "
                         "needs a fixed patch grid")
    if model.cls_token is None and config.class_token:
        raise ValueError("`class_token`: the schedule has a class token but the model has none")
    if model.cls_token is not None and not config.class_token:
        raise ValueError("`class_token`: the model has a class token but the schedule has none")
    if model.num_prefix_tokens != int(config.class_token):
        raise ValueError(f"prefix tokens: the model has {model.num_prefix_tokens} (register tokens: "
                         f"{model.num_reg_tokens}); patch supports a class token and no other prefix tokens")
    if model.no_embed_class:
        raise ValueError("`no_embed_class`: patch supports timm's original layout, with the class token's "
                         "positional embedding")


def _plain(block: nn.Module) -> bool:
    """A timm ``Block`` with a plain ``Attention`` (what tokennas' ``Block`` computes), or a patched block."""
    if isinstance(block, Block):
        return True
    if type(block) is not TimmBlock or type(block.attn) is not TimmAttention:
        return False
    attn = block.attn
    identities = (block.ls1, block.ls2, attn.q_norm, attn.k_norm, getattr(attn, "norm", nn.Identity()))
    return (all(isinstance(m, nn.Identity) for m in identities) and getattr(attn, "gate", None) is None
            and attn.num_heads * attn.head_dim == attn.qkv.in_features)
