"""What the families share: an attention that can hand its map on, a pre-norm block, token reductions.

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
    given, so it has no Q/K weights, no QK^T product and no softmax. ``value_from_qkv=True`` (with
    ``share_attn``): it keeps a full ``qkv`` projection and uses only its value third, so that a timm model
    patched to share attention (``tokennas.patch``) keeps its parameters and state-dict names.
    ``return_attn=True``: the map is materialised for the next block; otherwise fused SDPA runs.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, share_attn: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, value_from_qkv: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"`num_heads` ({num_heads}) must divide the width ({dim})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.share_attn = share_attn
        self.value_from_qkv = share_attn and value_from_qkv
        if share_attn and not value_from_qkv:
            self.v = nn.Linear(dim, dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, shared_attn: torch.Tensor | None = None, return_attn: bool = False,
                size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, tuple | None]:
        """Returns the output, the attention map (when materialised) and ``(q, k)`` (None when shared).

        ``size`` (B, N, 1): how many patches each token stands for after merging; ToMe's proportional
        attention adds log(size) of each key to the logits.
        """
        B, N, C = x.shape
        bias = None if size is None else size.log().reshape(B, 1, 1, N)  # (B, 1, 1, N), broadcast over queries
        if self.share_attn:
            if shared_attn is None:
                raise RuntimeError("a sharing attention block was called without an attention map")
            v = self.value(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, N, hd)
            attn, qk = shared_attn, None
            x = attn @ v
        else:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # (B, nh, N, hd) each
            qk = (q, k)
            drop = self.attn_drop if self.training else 0.0
            if return_attn:
                logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, nh, N, N)
                attn = (logits if bias is None else logits + bias).softmax(dim=-1)
                x = F.dropout(attn, drop, self.training) @ v
            else:
                attn = None
                x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
        x = self.proj(x.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(x), attn, qk

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """The value projection of a sharing block: ``v``, or the value third of ``qkv`` (``value_from_qkv``)."""
        if not self.value_from_qkv:
            return self.v(x)
        C = x.shape[-1]
        bias = None if self.qkv.bias is None else self.qkv.bias[2 * C :]
        return F.linear(x, self.qkv.weight[2 * C :], bias)


class Block(nn.Module):
    """Pre-norm transformer block, timm-compatible names; passes an attention map and token sizes through.

    ``reduction``: a weightless token reduction (``TokenMerge``, ``TokenPrune``, ``TokenDrop``, ``TokenPruneMerge``)
    run after the attention residual and before the MLP, as ToMe, EViT and DiffRate place it; it sees the block's
    own queries and keys.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 share_attn: bool = False, drop_path: float = 0.0, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, norm_layer: type[nn.Module] = LayerNorm,
                 mlp_layer: type[nn.Module] = Mlp, act_layer: type[nn.Module] = nn.GELU,
                 reduction: nn.Module | None = None) -> None:
        super().__init__()
        if reduction is not None and share_attn:
            raise ValueError("a block that shares attention has no queries and keys of its own to reduce with")
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, share_attn, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.reduction = reduction
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, shared_attn: torch.Tensor | None = None, return_attn: bool = False,
                size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns the tokens, the attention map (when ``return_attn``) and the token sizes (None: all 1)."""
        y, attn, qk = self.attn(self.norm1(x), shared_attn, return_attn, size)
        x = x + self.drop_path1(y)
        if self.reduction is not None:
            x, size = self.reduction(x, size, *qk)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x, attn, size


def check_trunk(config) -> None:
    """The checks every isotropic trunk shares: depth, heads dividing the width, MLP ratio, drop-path rate."""
    if config.depth < 1:
        raise ValueError(f"`depth` must be at least 1, got {config.depth}")
    if config.embed_dim < 1 or config.num_heads < 1 or config.embed_dim % config.num_heads:
        raise ValueError(f"`num_heads` ({config.num_heads}) must divide `embed_dim` ({config.embed_dim})")
    if config.mlp_ratio <= 0 or int(config.embed_dim * config.mlp_ratio) < 1:
        raise ValueError(f"`mlp_ratio` must give at least one MLP hidden unit at `embed_dim` {config.embed_dim}, "
                         f"got {config.mlp_ratio}")
    if not 0 <= config.drop_path_rate < 1:
        raise ValueError(f"`drop_path_rate` must be in [0, 1), got {config.drop_path_rate}")


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


REDUCE_KINDS = ("merge", "prune", "prune_merge")


def _take(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, k) of ``tokens`` (B, n, C)."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class TokenMerge(nn.Module):
    """ToMe's bipartite soft matching (Bolya et al., ICLR 2023), reducing the patch tokens to ``keep``.

    The metric is the block's keys averaged over heads, cosine-normalised. Patch tokens at even positions
    form set A, odd positions set B; each A token's most similar B token is its partner, and the
    r = n - keep A tokens with the most similar partners are merged into them (a size-weighted average;
    ``size`` counts the patches a token stands for). Class tokens are never merged. Output: prefix tokens,
    the unmerged A tokens in their order, then the B tokens. Weightless; its only MACs are the
    similarity product, ceil(n/2) * floor(n/2) * head_dim.
    """

    def __init__(self, keep: int, num_prefix_tokens: int) -> None:
        super().__init__()
        self.keep = keep
        self.num_prefix_tokens = num_prefix_tokens

    def extra_repr(self) -> str:
        return f"keep={self.keep}, num_prefix_tokens={self.num_prefix_tokens}"

    def forward(self, x: torch.Tensor, size: torch.Tensor | None, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.num_prefix_tokens
        B, N, C = x.shape
        r = N - p - self.keep
        metric = F.normalize(k.mean(dim=1)[:, p:], dim=-1)  # (B, n, hd), cosine-normalised
        similarity = metric[:, ::2] @ metric[:, 1::2].transpose(-2, -1)  # (B, |A|, |B|)
        best, partner = similarity.max(dim=-1)  # (B, |A|)
        order = best.argsort(dim=-1, descending=True)
        merged, kept = order[:, :r], order[:, r:].sort(dim=-1).values
        a, b = x[:, p:][:, ::2], x[:, p:][:, 1::2]
        target = partner.gather(1, merged).unsqueeze(-1)  # (B, r, 1): the B token each merged A token joins
        # B tokens become size-weighted sums, divided by their new sizes; unmerged A tokens are left as they are
        if size is None:  # every token stands for one patch: no weights to apply
            ones = torch.ones_like(x[..., :1])  # (B, N, 1)
            size_a, size_b = ones[:, p:][:, ::2], ones[:, p:][:, 1::2]
            prefix_size, moved = ones[:, :p], _take(a, merged)
        else:
            size_a, size_b = size[:, p:][:, ::2], size[:, p:][:, 1::2]
            prefix_size, moved, b = size[:, :p], _take(a, merged) * _take(size_a, merged), b * size_b
        b = b.scatter_add(1, target.expand(-1, -1, C), moved)
        size_b = size_b.scatter_add(1, target, _take(size_a, merged))
        x = torch.cat([x[:, :p], _take(a, kept), b / size_b], dim=1)
        return x, torch.cat([prefix_size, _take(size_a, kept), size_b], dim=1)


class TokenPrune(nn.Module):
    """EViT's token reorganisation (Liang et al., ICLR 2022), reducing the patch tokens to ``keep``.

    A patch token's score is the attention the class token pays it, averaged over heads (recomputed as
    softmax(q_cls K^T / sqrt(hd)) over all tokens, so that the block can run fused attention). Without a
    class token the query is the mean of the queries over the tokens. The ``keep - 1`` best-scored patch
    tokens stay, in their order; the others are fused into one last token, their score-weighted average
    ("inattentive token fusion"; the weights are normalised to sum to one). MACs: the scoring, N * dim,
    and the fusing matmul, (n - keep + 1) * dim. Token sizes pass through unchanged.
    """

    def __init__(self, keep: int, num_prefix_tokens: int, scale: float) -> None:
        super().__init__()
        self.keep = keep
        self.num_prefix_tokens = num_prefix_tokens
        self.scale = scale

    def extra_repr(self) -> str:
        return f"keep={self.keep}, num_prefix_tokens={self.num_prefix_tokens}"

    def score(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(B, n): the attention the class token (else the mean query) pays each patch token, averaged over heads."""
        p = self.num_prefix_tokens
        query = q[:, :, :1] if p else q.mean(dim=2, keepdim=True)  # (B, nh, 1, hd)
        attn = ((query * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, nh, 1, N)
        return attn.mean(dim=1)[:, 0, p:]

    def forward(self, x: torch.Tensor, size: torch.Tensor | None, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = self.num_prefix_tokens
        score = self.score(q, k)
        order = score.argsort(dim=-1, descending=True)
        kept, fused = order[:, : self.keep - 1].sort(dim=-1).values, order[:, self.keep - 1 :]
        tokens = x[:, p:]
        weights = score.gather(1, fused)  # (B, n - keep + 1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        fused_token = weights.unsqueeze(1) @ _take(tokens, fused)  # (B, 1, C)
        return torch.cat([x[:, :p], _take(tokens, kept), fused_token], dim=1), size


class TokenDrop(TokenPrune):
    """DiffRate's pruning (Chen et al., ICCV 2023), reducing the patch tokens to ``keep`` without fusion.

    Scored as ``TokenPrune`` scores (the class token's attention averaged over heads, or the mean query's
    without a class token); the ``keep`` best-scored patch tokens stay, in their order, and the others are
    dropped with their sizes. MACs: the scoring, N * dim (``drop_flops``).
    """

    def kept(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(B, keep): the positions, among the patch tokens, of those that stay, in increasing order."""
        return self.score(q, k).argsort(dim=-1, descending=True)[:, : self.keep].sort(dim=-1).values

    def take(self, tokens: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The prefix rows and the ``kept`` patch rows of ``tokens`` (B, N, C)."""
        p = self.num_prefix_tokens
        return torch.cat([tokens[:, :p], _take(tokens[:, p:], kept)], dim=1)

    def forward(self, x: torch.Tensor, size: torch.Tensor | None, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        kept = self.kept(q, k)
        return self.take(x, kept), None if size is None else self.take(size, kept)


class TokenPruneMerge(nn.Module):
    """DiffRate's reduction (Chen et al., ICCV 2023): prune the patch tokens to ``prune`` (``TokenDrop``), then merge
    the survivors to ``keep`` with ToMe's bipartite matching on their own keys (``TokenMerge``). Built only when
    both steps remove tokens; a block where one of them removes none runs the other alone."""

    def __init__(self, prune: int, keep: int, num_prefix_tokens: int, scale: float) -> None:
        super().__init__()
        self.drop = TokenDrop(prune, num_prefix_tokens, scale)
        self.merge = TokenMerge(keep, num_prefix_tokens)

    def forward(self, x: torch.Tensor, size: torch.Tensor | None, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept = self.drop.kept(q, k)
        x, size = self.drop.take(x, kept), None if size is None else self.drop.take(size, kept)
        # the merge's metric is the keys averaged over heads: averaging, then keeping the survivors, is the same
        metric = self.drop.take(k.mean(dim=1), kept).unsqueeze(1)  # (B, 1, prefix + prune, hd)
        return self.merge(x, size, None, metric)


def drop_flops(patch_tokens: int, keep: int, num_prefix_tokens: int, dim: int) -> int:
    """MACs of ``TokenDrop`` reducing ``patch_tokens`` to ``keep``: the scoring only (0 when nothing is dropped)."""
    return (patch_tokens + num_prefix_tokens) * dim if keep < patch_tokens else 0


def reduction_flops(kind: str, patch_tokens: int, keep: int, num_prefix_tokens: int, dim: int,
                    num_heads: int) -> int:
    """MACs of ``TokenMerge`` (``kind`` merge) or ``TokenPrune`` (prune) reducing ``patch_tokens`` to ``keep`` (0 when
    nothing is removed). A prune_merge block costs ``drop_flops`` to its pruned count plus this merge from it."""
    n = patch_tokens
    if keep >= n:
        return 0
    if kind == "merge":
        return ((n + 1) // 2) * (n // 2) * (dim // num_heads)
    return (n + num_prefix_tokens) * dim + (n - keep + 1) * dim


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


def block_flops(tokens: int, dim: int, mlp_ratio: float, share_attn: bool = False,
                mlp_tokens: int | None = None) -> int:
    """MACs of one ``Block``: norm and attention over ``tokens`` tokens, norm and MLP over ``mlp_tokens`` (default:
    the same; fewer when the block reduces its tokens, whose own cost is ``reduction_flops``)."""
    hidden = int(dim * mlp_ratio)
    mlp_tokens = tokens if mlp_tokens is None else mlp_tokens
    return (ln_flops(tokens, dim) + attention_flops(tokens, dim, share_attn) + ln_flops(mlp_tokens, dim)
            + 2 * mlp_tokens * dim * hidden)


def block_params(dim: int, mlp_ratio: float, qkv_bias: bool = True, share_attn: bool = False) -> int:
    hidden = int(dim * mlp_ratio)
    return 4 * dim + attention_params(dim, qkv_bias, share_attn) + 2 * dim * hidden + hidden + dim
