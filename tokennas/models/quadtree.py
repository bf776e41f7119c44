"""Batched quadtree mosaic tokenizer and its saliency scorers.

Follows Ronen, Levy and Golbert 2023, "Vision Transformers with Mixed-Resolution Tokenization" (Quadformer,
arXiv 2304.00287): the image starts as a grid of ``max_patch_size`` patches and the most salient patch is split
into four, again and again, until the mosaic holds ``budget`` patches (each split adds 3); patches never get
smaller than ``min_patch_size``. Every patch, whatever its size, is area-resized to ``patch_size`` pixels.

The authors' code splits one patch per step in a loop. Here the greedy order is computed for the whole batch in
closed form (``select_splits``): a loop over quadtree levels only, never over patches or splits.

Scorers (saliency of a patch; higher splits first):

- ``pixel-blur``: RMS error between the patch and its copy at the embedding resolution, times the patch side
  (the paper's pixel-blur scorer, ``sqrt(mse * patch_size)``, with area resampling: the error is the variance
  inside each embedding cell, which is exactly what the token loses);
- ``feature``: mean squared error between features of the image and of blurred copies of it (one per level,
  blurred as that level's tokens are), from the first stages of a small timm CNN (``lcnet_050``; the paper uses
  a truncated ShuffleNetV2 x0.5). It needs weights: a state-dict file or ``"timm"`` for timm's pretrained ones;
- ``random``: uniform random scores, the ablation.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

SCORERS = ("pixel-blur", "feature", "random")
FEATURE_MODEL = "lcnet_050"  # timm CNN of the feature scorer
# lcnet_050 up to stride 16, as stages of depthwise-separable blocks (kernel, stride, in, out); stem: 3x3/2 -> 8.
_LCNET_STEM = 8
_LCNET_STAGES = (
    ((3, 1, 8, 16),),
    ((3, 2, 16, 32), (3, 1, 32, 32)),
    ((3, 2, 32, 64), (3, 1, 64, 64)),
    ((3, 2, 64, 128), (5, 1, 128, 128)),
    ((5, 1, 128, 128),) * 4,
)
_LCNET_STAGES_FOR_STRIDE = {2: 1, 4: 2, 8: 3, 16: 5}  # timm's feature_info: blocks.0, .1, .2, .4


class Mosaic(NamedTuple):
    """A batch of mosaics: ``pixels`` (B, N, C*p*p) in (C, h, w) order, ``centres`` (B, N, 2) as (x, y) and
    ``scales`` (B, N) in units of the min patch, ``levels`` (B, N) (0: max patch), ``mask`` (B, N) or None."""

    pixels: torch.Tensor
    centres: torch.Tensor
    scales: torch.Tensor
    levels: torch.Tensor
    mask: torch.Tensor | None


# --- Geometry and budgets -------------------------------------------------------------------------------------

def num_levels(min_patch_size: int, max_patch_size: int) -> int:
    """Patch sizes in the quadtree: max, max/2, ..., min."""
    return int(math.log2(max_patch_size // min_patch_size)) + 1


def valid_budgets(img_size: int, min_patch_size: int, max_patch_size: int) -> range:
    """Every reachable mosaic size: the coarse grid plus 3 per split, up to the full grid of min patches."""
    return range((img_size // max_patch_size) ** 2, (img_size // min_patch_size) ** 2 + 1, 3)


def check_geometry(img_size: int, patch_size: int, min_patch_size: int, max_patch_size: int, budget: int) -> None:
    """Raise ``ValueError`` naming the field when a mosaic cannot be built."""
    if min_patch_size < 1 or patch_size < 1 or min_patch_size % patch_size:
        raise ValueError(f"`patch_size` ({patch_size}) must divide `min_patch_size` ({min_patch_size}): every "
                         "mosaic patch is area-resized to patch_size")
    ratio = max_patch_size / min_patch_size
    if max_patch_size < min_patch_size or max_patch_size % min_patch_size or not math.log2(ratio).is_integer():
        raise ValueError(f"`max_patch_size` ({max_patch_size}) must be `min_patch_size` ({min_patch_size}) times a "
                         f"power of 2, e.g. {min_patch_size}, {2 * min_patch_size} or {4 * min_patch_size}")
    if img_size % max_patch_size:
        raise ValueError(f"`max_patch_size` ({max_patch_size}) must divide `img_size` ({img_size})")
    valid = valid_budgets(img_size, min_patch_size, max_patch_size)
    if budget not in valid:
        below = [b for b in valid if b <= budget][-1:]
        above = [b for b in valid if b >= budget][:1]
        raise ValueError(
            f"`budget` {budget} cannot be reached with {min_patch_size}-{max_patch_size}px patches at {img_size}px: "
            f"a mosaic starts with {valid.start} patches and each split adds 3, up to {valid[-1]}; nearest valid "
            f"budgets: {', '.join(map(str, below + above))}")


def feature_stride(min_patch_size: int) -> int:
    """Stride of the feature scorer's map: the deepest lcnet stage (<= 16) whose stride divides 2 * min patch,
    so that the map tiles every patch that can split."""
    return max(s for s in _LCNET_STAGES_FOR_STRIDE if (2 * min_patch_size) % s == 0)


def feature_cnn_costs(img_size: int, in_chans: int, stride: int) -> tuple[int, int]:
    """(MACs of one pass at ``img_size``, parameters) of the truncated lcnet_050; batch norm as fvcore counts it
    in eval mode (2 per element), convolutions without bias."""
    h = img_size // 2
    macs = in_chans * 9 * _LCNET_STEM * h * h + 2 * _LCNET_STEM * h * h
    params = in_chans * 9 * _LCNET_STEM + 2 * _LCNET_STEM
    for stage in _LCNET_STAGES[: _LCNET_STAGES_FOR_STRIDE[stride]]:
        for k, s, cin, cout in stage:
            h //= s
            macs += (cin * k * k + 2 * cin + cin * cout + 2 * cout) * h * h
            params += cin * k * k + 2 * cin + cin * cout + 2 * cout
    return macs, params


def scorer_costs(scorer: str, img_size: int, in_chans: int, min_patch_size: int, max_patch_size: int
                 ) -> tuple[int, int]:
    """(MACs per image, parameters) of a scorer. Pixel-blur and random do no multiply-accumulate."""
    splittable = num_levels(min_patch_size, max_patch_size) - 1
    if scorer != "feature" or not splittable:
        return 0, 0
    macs, params = feature_cnn_costs(img_size, in_chans, feature_stride(min_patch_size))
    # the image and one blurred copy per splittable level; each copy is a bilinear upsample (4 per output)
    return (1 + splittable) * macs + splittable * 4 * in_chans * img_size**2, params


# --- Greedy splitting for a whole batch -----------------------------------------------------------------------

def _expand(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, g, g) -> (B, g * factor, g * factor): each node's value copied onto its descendants."""
    if factor == 1:
        return x
    return x.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


def _greedy_keys(path: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Sort keys of nodes from their root-to-node scores ``path`` (B, depth + 1, n) -> (B, num_keys, n).

    Key 1 is the minimum score on the path (its first arg-min is the anchor); key 2 the minimum strictly below the
    anchor, and so on; exhausted keys are +inf, so a node outranks its descendants.
    """
    pos = torch.arange(path.shape[1], device=path.device).view(1, -1, 1)
    start = torch.zeros_like(path[:, 0], dtype=torch.long)  # (B, n): first path position still open
    keys = []
    for _ in range(num_keys):
        neg_min, anchor = path.masked_fill(pos < start.unsqueeze(1), math.inf).neg().max(dim=1)  # first arg-min
        keys.append(neg_min.neg())
        start = torch.where(anchor >= start, anchor + 1, start)  # unchanged once every position is closed
    return torch.stack(keys, dim=1)


def select_splits(scores: list[torch.Tensor], num_splits: int | torch.Tensor) -> list[torch.Tensor]:
    """Which patches the greedy most-salient-first quadtree splits, for a whole batch at once.

    ``scores[l]`` (B, g_l, g_l) are the saliencies of the level-l patches that may split (level 0 coarsest,
    g_{l+1} = 2 g_l); ``num_splits`` is an int or a (B,) tensor. Returns one (B, g_l, g_l) bool mask per level.

    Greedy splits the most salient current leaf, one at a time. Its split order is the descending lexicographic
    order of ``_greedy_keys``: first the running minimum of the scores down the tree (a child, capped by its
    parent, never outranks it), then, among the nodes that share that minimum (one subtree below the node that
    set it), the same rule applied below that node, and so on. So the splits are the first ``num_splits`` nodes
    after stable sorts, one per key (at most one per level). Exact for distinct scores (the test compares with
    a sequential heap); among tied keys the coarser patch splits first, as in the authors' code.
    """
    num_keys = len(scores)
    keys = torch.cat([
        _greedy_keys(torch.stack([_expand(scores[a], 2 ** (l - a)).flatten(1) for a in range(l + 1)], dim=1), num_keys)
        for l in range(num_keys)
    ], dim=2)  # (B, num_keys, M), nodes coarse to fine, raster order within a level
    B, _, M = keys.shape
    order = torch.arange(M, device=keys.device).expand(B, M)
    for k in reversed(range(num_keys)):  # least significant key first; stable sorts keep coarse-first ties
        order = order.gather(1, keys[:, k].gather(1, order).sort(dim=1, descending=True, stable=True).indices)
    rank = torch.zeros_like(order).scatter(1, order, torch.arange(M, device=keys.device).expand(B, M))
    if isinstance(num_splits, torch.Tensor):
        num_splits = num_splits.view(B, 1)
    split = rank < num_splits  # (B, M)
    sizes = [s.shape[-1] for s in scores]
    return [m.view(B, g, g) for m, g in zip(split.split([g * g for g in sizes], dim=1), sizes, strict=True)]


# --- Scorers ----------------------------------------------------------------------------------------------------

def _patch_mean(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/kernel, W/kernel): mean over channels and each kernel x kernel cell."""
    x = x.mean(dim=1, keepdim=True)
    return (F.avg_pool2d(x, kernel) if kernel > 1 else x).squeeze(1)


class PixelBlurScorer(nn.Module):
    """``sqrt(mse * patch)``: the error of representing each patch at the embedding resolution (no weights)."""

    def __init__(self, patch_sizes: list[int], patch_size: int) -> None:
        super().__init__()
        self.patch_sizes, self.patch_size = patch_sizes, patch_size

    def forward(self, x: torch.Tensor, small: list[torch.Tensor]) -> list[torch.Tensor]:
        sq = x * x
        first = self.patch_sizes[-1] // self.patch_size  # pools the finest level down from the full image
        sq = F.avg_pool2d(sq, first) if first > 1 else sq
        scores = []
        for level in reversed(range(len(small))):
            sq = F.avg_pool2d(sq, 2)  # mean of squares over each cell of this level's embedding grid
            var = (sq - small[level] * small[level]).clamp(min=0)  # per-cell variance = squared error to the cell mean
            scores.append((_patch_mean(var, self.patch_size) * self.patch_sizes[level]).sqrt())
        return scores[::-1]


class RandomScorer(nn.Module):
    """Uniform random saliency: the paper's ablation."""

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor, small: list[torch.Tensor]) -> list[torch.Tensor]:
        grids = [s.shape[-1] // self.patch_size for s in small]
        return [torch.rand(x.shape[0], g, g, device=x.device) for g in grids]


def load_feature_cnn(checkpoint: str, in_chans: int, stride: int) -> nn.Module:
    """The first stages of lcnet_050 with the user's weights: a state-dict file, or ``"timm"`` for timm's pretrained
    weights (from the user's cache). Checkpoints are read with ``weights_only=True``; RGB stems are adapted."""
    import timm
    from timm.models import adapt_input_conv

    if not checkpoint:
        raise ValueError(f"`scorer_checkpoint` is required for scorer 'feature': a {FEATURE_MODEL} state-dict file, "
                         "or 'timm' for timm's pretrained weights; without weights the features would be random")
    try:
        cnn = timm.create_model(FEATURE_MODEL, pretrained=checkpoint == "timm", in_chans=in_chans)
    except Exception as err:  # hub, network and cache errors all mean: no weights here
        raise ValueError(f"`scorer_checkpoint`: timm could not load pretrained {FEATURE_MODEL} weights ({err}); "
                         "pass the path of a local state-dict file instead") from None
    trunk = nn.Sequential(OrderedDict(conv_stem=cnn.conv_stem, bn1=cnn.bn1,
                                      blocks=cnn.blocks[: _LCNET_STAGES_FOR_STRIDE[stride]]))
    if checkpoint != "timm":
        path = Path(checkpoint)
        if not path.is_file():
            raise ValueError(f"`scorer_checkpoint` file {checkpoint!r} does not exist")
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        stem = state.get("conv_stem.weight")
        if stem is not None and stem.shape[1] != in_chans:
            state["conv_stem.weight"] = adapt_input_conv(in_chans, stem, base_chans=stem.shape[1])
        wanted = trunk.state_dict()
        missing = [k for k in wanted if k not in state and not k.endswith("num_batches_tracked")]
        if missing:
            raise ValueError(f"`scorer_checkpoint` {checkpoint!r} is not a {FEATURE_MODEL} state dict: it lacks "
                             f"{', '.join(missing[:3])}")
        try:
            trunk.load_state_dict({k: state[k] for k in wanted if k in state}, strict=False)
        except RuntimeError as err:
            raise ValueError(f"`scorer_checkpoint` {checkpoint!r} does not fit {FEATURE_MODEL}: "
                             f"{str(err).splitlines()[-1].strip()}") from None
    return trunk.requires_grad_(False).eval()


class FeatureScorer(nn.Module):
    """Feature error between the image and its blurred copies, pooled per patch (frozen CNN, always in eval)."""

    def __init__(self, cnn: nn.Module, stride: int, patch_sizes: list[int]) -> None:
        super().__init__()
        self.cnn, self.stride, self.patch_sizes = cnn, stride, patch_sizes

    def train(self, mode: bool = True) -> FeatureScorer:
        super().train(mode)
        self.cnn.eval()  # frozen batch-norm statistics
        return self

    def forward(self, x: torch.Tensor, small: list[torch.Tensor]) -> list[torch.Tensor]:
        B, _, H, W = x.shape
        blurred = [F.interpolate(s, size=(H, W), mode="bilinear", align_corners=False) for s in small]
        features = self.cnn(torch.cat([x, *blurred], dim=0)).split(B)  # (B, C', H/s, W/s) each
        return [_patch_mean((f - features[0]) ** 2, self.patch_sizes[level] // self.stride)
                for level, f in enumerate(features[1:])]


def build_scorer(scorer: str, checkpoint: str, in_chans: int, patch_size: int, min_patch_size: int,
                 max_patch_size: int) -> nn.Module:
    patch_sizes = [max_patch_size >> level for level in range(num_levels(min_patch_size, max_patch_size))]
    if scorer == "pixel-blur":
        return PixelBlurScorer(patch_sizes, patch_size)
    if scorer == "random":
        return RandomScorer(patch_size)
    if scorer == "feature":
        stride = feature_stride(min_patch_size)
        return FeatureScorer(load_feature_cnn(checkpoint, in_chans, stride), stride, patch_sizes)
    raise ValueError(f"`scorer` must be one of {', '.join(SCORERS)}, got {scorer!r}")


# --- Tokenizer --------------------------------------------------------------------------------------------------

class QuadtreeTokenizer(nn.Module):
    """Images (B, C, H, W) -> a ``Mosaic`` of exactly ``budget`` patches per image (or per-image ``budgets``).

    Level l holds patches of ``max_patch_size / 2**l`` pixels on a g_l x g_l grid. Every candidate patch of every
    level is pooled to ``patch_size`` pixels once (an area-resize pyramid); the scorer rates the ones that may
    split, ``select_splits`` picks the splits, and the leaves are gathered coarse to fine, in raster order within a
    level (the full-grid mosaic is thus the uniform ViT's token order).
    """

    def __init__(self, img_size: int, in_chans: int, patch_size: int, min_patch_size: int, max_patch_size: int,
                 budget: int, scorer: nn.Module | None) -> None:
        super().__init__()
        check_geometry(img_size, patch_size, min_patch_size, max_patch_size, budget)
        self.img_size, self.in_chans, self.patch_size = img_size, in_chans, patch_size
        self.min_patch_size, self.max_patch_size, self.budget = min_patch_size, max_patch_size, budget
        self.patch_sizes = [max_patch_size >> level for level in range(num_levels(min_patch_size, max_patch_size))]
        self.grids = [img_size // p for p in self.patch_sizes]
        self.scorer = scorer if len(self.patch_sizes) > 1 else None
        centres, scales, levels = [], [], []
        for level, (p, g) in enumerate(zip(self.patch_sizes, self.grids, strict=True)):
            ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
            centres.append((torch.stack([xs, ys], dim=-1).view(-1, 2) + 0.5) * (p / min_patch_size))
            scales.append(torch.full((g * g,), p / min_patch_size))
            levels.append(torch.full((g * g,), level))
        self.register_buffer("node_centres", torch.cat(centres), persistent=False)  # (T, 2)
        self.register_buffer("node_scales", torch.cat(scales), persistent=False)  # (T,)
        self.register_buffer("node_levels", torch.cat(levels), persistent=False)  # (T,)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, g*p, g*p) -> (B, g*g, C*p*p), raster order, pixels in (C, h, w) order like a conv weight."""
        B, C, H, _ = x.shape
        p, g = self.patch_size, H // self.patch_size
        return x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)

    def forward(self, x: torch.Tensor, budgets: torch.Tensor | None = None) -> Mosaic:
        B = x.shape[0]
        first = self.min_patch_size // self.patch_size
        small = [F.avg_pool2d(x, first) if first > 1 else x]  # each level at the embedding resolution
        for _ in self.patch_sizes[1:]:
            small.insert(0, F.avg_pool2d(small[0], 2))
        num_tokens = self.budget
        if budgets is not None:
            budgets = torch.as_tensor(budgets, device=x.device).view(B)
            for b in budgets.tolist():
                check_geometry(self.img_size, self.patch_size, self.min_patch_size, self.max_patch_size, int(b))
            num_tokens = int(budgets.max())
        is_token = [torch.ones(B, self.grids[0], self.grids[0], dtype=torch.bool, device=x.device)]
        if self.scorer is not None:
            with torch.no_grad():
                scores = self.scorer(x, small[:-1])  # (B, g_l, g_l) per level that may split
                num_splits = ((self.budget if budgets is None else budgets) - self.grids[0] ** 2) // 3
                split = select_splits(scores, num_splits)
            for level, s in enumerate(split):  # a patch exists if its parent split; it is a leaf if it did not
                is_token.append(_expand(is_token[level] & s, 2))
                is_token[level] = is_token[level] & ~s
        is_token = torch.cat([t.flatten(1) for t in is_token], dim=1)  # (B, T)
        idx = torch.argsort(is_token.to(torch.uint8), dim=1, descending=True, stable=True)[:, :num_tokens]  # (B, N)
        patches = torch.cat([self.patchify(s) for s in small], dim=1)  # (B, T, C*p*p)
        pixels = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        mask = None
        if budgets is not None:
            mask = torch.arange(num_tokens, device=x.device).expand(B, -1) < budgets.view(B, 1)
            pixels = pixels.masked_fill(~mask.unsqueeze(-1), 0.0)
        return Mosaic(pixels, self.node_centres[idx], self.node_scales[idx], self.node_levels[idx], mask)


def tokenizer_from_config(config: Any) -> QuadtreeTokenizer:
    """The tokenizer (with its scorer) a Quadformer config describes."""
    c = config
    scorer = None
    if c.min_patch_size != c.max_patch_size:
        scorer = build_scorer(c.scorer, c.scorer_checkpoint, c.in_chans, c.patch_size, c.min_patch_size,
                              c.max_patch_size)
    return QuadtreeTokenizer(c.img_size, c.in_chans, c.patch_size, c.min_patch_size, c.max_patch_size, c.budget,
                             scorer)


def draw_mosaic(config: Any, images: Any, path: str | Path, max_images: int = 8) -> Path:
    """Save a PNG of the mosaic ``config`` builds over a few images (B, C, H, W or B, H, W; resized if needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    x = torch.as_tensor(images)[:max_images]
    x = (x.float() / 255 if x.dtype == torch.uint8 else x.float())
    x = x.unsqueeze(1) if x.ndim == 3 else x
    if x.shape[-1] != config.img_size:
        x = F.interpolate(x, size=(config.img_size, config.img_size), mode="bilinear", align_corners=False)
    tokenizer = tokenizer_from_config(config).eval()
    with torch.no_grad():
        mosaic = tokenizer(x)
    fig, axes = plt.subplots(1, len(x), figsize=(2.2 * len(x), 2.4), squeeze=False)
    for ax, image, centres, scales in zip(axes[0], x, mosaic.centres, mosaic.scales, strict=True):
        shown = image.permute(1, 2, 0).numpy()
        shown = (shown - shown.min()) / max(float(shown.max() - shown.min()), 1e-8)
        ax.imshow(shown[..., 0] if shown.shape[-1] == 1 else shown[..., :3], cmap="gray")
        for (cx, cy), s in zip(centres.tolist(), scales.tolist(), strict=True):
            side = s * config.min_patch_size
            ax.add_patch(Rectangle(((cx - s / 2) * config.min_patch_size - 0.5, (cy - s / 2) * config.min_patch_size
                                    - 0.5), side, side, fill=False, lw=0.6, ec="tab:orange"))
        ax.set_axis_off()
    fig.suptitle(f"{config.budget} tokens, {config.min_patch_size}-{config.max_patch_size}px, {config.scorer}",
                 fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
