"""Supernet: one set of weights that runs every ScheduleViT schedule of a space (the one-shot strategy).

Weight entanglement as in AutoFormer (Chen et al., ICCV 2021): a child of width ``d`` uses the first ``d``
channels of every tensor, a child of depth ``L`` the first ``L`` blocks, an MLP of ``h`` hidden units the
first ``h``. Heads need no weights of their own: a child with ``H`` heads splits the same first ``d`` query, key
and value channels into ``H`` groups, so every head count shares them. A block that reuses the previous
block's attention map (PSViT) uses the value third of the parent's ``qkv``. HVT's positional embedding after
its ``k``-th pooling and PSViT's conv pooling are held per pooling stage: the ``k``-th pooling of any child
uses stage ``k``'s tensors (max1d pooling leaves the same tokens at stage ``k`` whatever the depth). A child
without a class token uses the patch part of the positional embeddings. Merging, pruning and max/avg
pooling have no weights.

What cannot share: the patch size. A child with another patch grid would see other pixels per token through
another embedding, so a space whose candidates use several patch sizes is refused, naming the dimension.

A child is the real ``ScheduleViT`` of its config, built on the meta device (no memory, no init) and run by
``torch.func.functional_call`` on slices of the parent's tensors: gradients reach the shared weights, and the
child computes exactly what the stand-alone model of that config computes, at exactly its MACs.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..config import build_model, config_from_dict, config_key
from ..parents import resolve_parent
from .layers import pooled_length
from .schedule_vit import ScheduleViT, ScheduleViTConfig


def parent_config(configs: list[ScheduleViTConfig]) -> tuple[ScheduleViTConfig, int, int]:
    """The trunk every config slices from (widest, deepest, largest MLP, with a class token, no schedule),
    and how many pooling stages need a positional embedding and a conv pooling."""
    if not configs:
        raise ValueError("a supernet needs at least one config")
    first = configs[0]
    for field in ("patch_size", "img_size", "in_chans", "num_classes", "qkv_bias"):
        values = sorted({getattr(c, field) for c in configs})
        if len(values) > 1:
            raise ValueError(f"`{field}` cannot share weights: the candidates use {values}; a supernet needs one")
    width = max(c.embed_dim for c in configs)
    ratio = max(int(c.embed_dim * c.mlp_ratio) for c in configs) / width
    trunk = ScheduleViTConfig(img_size=first.img_size, in_chans=first.in_chans, num_classes=first.num_classes,
                              patch_size=first.patch_size, embed_dim=width, depth=max(c.depth for c in configs),
                              num_heads=1, mlp_ratio=ratio, qkv_bias=first.qkv_bias)
    pos_stages = max((len(c.pool_after) for c in configs if c.stage_pos_embed), default=0)
    conv_stages = max((len(c.pool_after) for c in configs if c.pool_kind == "conv2d"), default=0)
    return trunk, pos_stages, conv_stages


class Supernet(ScheduleViT):
    """The parent: a uniform ViT (timm's names, so a timm ViT/DeiT state dict loads into it) plus one
    positional embedding and one conv pooling per pooling stage. ``forward(x, config)`` runs a child."""

    def __init__(self, config: ScheduleViTConfig, pos_stages: int = 0, conv_stages: int = 0,
                 cache: int = 4096) -> None:
        if config.pool_after or config.share_attn or getattr(config, "keep_tokens", ()):
            raise ValueError("a supernet's trunk is a uniform ViT: no pooling, sharing or merging")
        super().__init__(config)
        D, n = config.embed_dim, config.grid**2
        tokens = []
        for _ in range(pos_stages):  # stage k's tokens after k max1d poolings, plus a class-token slot
            n = pooled_length("max1d", n, (0, 0))[0]
            tokens.append(n)
        self.stage_pos = nn.ParameterList(nn.Parameter(torch.zeros(1, t + 1, D)) for t in tokens)
        for p in self.stage_pos:
            nn.init.trunc_normal_(p, std=0.02)
        self.pool_convs = nn.ModuleList(nn.Conv2d(D, D, 3, 2, 1, groups=D) for _ in range(conv_stages))
        self.spec = {"config": config.to_dict(), "pos_stages": pos_stages, "conv_stages": conv_stages}
        self._children: OrderedDict[str, nn.Module] = OrderedDict()
        self._cache = cache

    # -- children --
    def check(self, config: ScheduleViTConfig) -> None:
        """Raise ``ValueError`` naming the dimension a config needs beyond what this parent holds."""
        trunk = self.config
        if config.family != "schedule_vit":
            raise ValueError(f"a supernet runs schedule_vit configs, not {config.family}")
        needs = [("patch_size", config.patch_size, trunk.patch_size, "!="), ("img_size", config.img_size,
                 trunk.img_size, "!="), ("in_chans", config.in_chans, trunk.in_chans, "!="),
                 ("num_classes", config.num_classes, trunk.num_classes, "!="),
                 ("embed_dim", config.embed_dim, trunk.embed_dim, ">"), ("depth", config.depth, trunk.depth, ">"),
                 ("mlp hidden units", int(config.embed_dim * config.mlp_ratio),
                  int(trunk.embed_dim * trunk.mlp_ratio), ">"), ("qkv_bias", config.qkv_bias, trunk.qkv_bias, "!=")]
        for name, want, have, rule in needs:
            if (want != have) if rule == "!=" else (want > have):
                relation = "" if rule == "!=" else "at most "
                raise ValueError(f"the candidate's `{name}` is {want} but the parent holds {relation}{have}")
        if config.stage_pos_embed and len(config.pool_after) > len(self.stage_pos):
            raise ValueError(f"the candidate pools {len(config.pool_after)} times with stage positional embeddings; "
                             f"the parent holds {len(self.stage_pos)}")
        if config.pool_kind == "conv2d" and len(config.pool_after) > len(self.pool_convs):
            raise ValueError(f"the candidate has {len(config.pool_after)} conv poolings; the parent holds "
                             f"{len(self.pool_convs)}")

    def _child(self, config: ScheduleViTConfig) -> nn.Module:
        key = config_key(config)
        child = self._children.get(key)
        if child is None:
            self.check(config)
            with torch.device("meta"):
                child = build_model(config)
            self._children[key] = child
            if len(self._children) > self._cache:
                self._children.popitem(last=False)
        else:
            self._children.move_to_end(key)
        return child

    def child_weights(self, config: ScheduleViTConfig, child: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The child's parameters, by its own names, as slices of the parent's (gradients flow back)."""
        child = child if child is not None else self._child(config)
        own = dict(self.named_parameters())
        D = self.config.embed_dim
        stage = {b: k for k, b in enumerate(config.pool_after)}
        out = {}
        for name, meta in child.named_parameters():
            shape = meta.shape
            parts = name.split(".")
            if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
                d = config.embed_dim
                full = own[name].view(3, D, *own[name].shape[1:])  # q, k, v thirds
                out[name] = (full[:, :d, :d] if parts[-1] == "weight" else full[:, :d]).reshape(shape)
            elif name.endswith(("attn.v.weight", "attn.v.bias")):  # attention sharing: the value third
                source = own[name.replace("attn.v.", "attn.qkv.")]
                full = source.view(3, D, *source.shape[1:])[2]
                out[name] = full[tuple(slice(0, s) for s in shape)]
            elif parts[0] == "token_pools" and parts[-1] == "pos_embed":
                out[name] = self.stage_pos[stage[int(parts[1])]][:, -shape[1]:, : shape[2]]
            elif parts[0] == "token_pools" and parts[2] == "conv":
                source = getattr(self.pool_convs[stage[int(parts[1])]], parts[-1])
                out[name] = source[tuple(slice(0, s) for s in shape)]
            elif name == "pos_embed":  # a child without a class token takes the patch positions
                out[name] = own[name][:, -shape[1]:, : shape[2]]
            else:
                out[name] = own[name][tuple(slice(0, s) for s in shape)]
            if out[name].shape != shape:
                raise RuntimeError(f"supernet slice for {name} has shape {tuple(out[name].shape)}, "
                                   f"expected {tuple(shape)}")
        return out

    def forward(self, x: torch.Tensor, config: ScheduleViTConfig | None = None) -> torch.Tensor:
        if config is None:
            return super().forward(x)
        child = self._child(config)
        child.train(self.training)
        return functional_call(child, self.child_weights(config, child), (x,))

    def child_state_dict(self, config: ScheduleViTConfig) -> dict[str, torch.Tensor]:
        """Stand-alone weights for ``config`` (contiguous copies): ``build_model(config).load_state_dict``."""
        with torch.no_grad():
            return {k: v.detach().clone().contiguous() for k, v in self.child_weights(config).items()}

    def child_model(self, config: ScheduleViTConfig) -> nn.Module:
        """The stand-alone model of ``config`` with the inherited weights."""
        with torch.device("meta"):
            model = build_model(config)
        model.load_state_dict(self.child_state_dict(config), assign=True)
        return model

    # -- persistence --
    def save(self, path: Path, **extra: Any) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"model": self.state_dict(), "config": self.config.to_dict(), "supernet": self.spec, **extra}, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Supernet:
        spec = state["supernet"]
        net = cls(config_from_dict(spec["config"]), spec["pos_stages"], spec["conv_stages"])
        net.load_state_dict(state["model"])
        return net

    @classmethod
    def load(cls, path: str | Path) -> Supernet:
        return cls.from_state(torch.load(path, map_location="cpu", weights_only=True))


# -- parents: a tokennas checkpoint, a supernet, or a timm ViT/DeiT state dict --
@dataclasses.dataclass
class Parent:
    """Weights read from ``--parent``, fitted to the data: ``trunk`` is their uniform ViT at the search's
    resolution, channels and classes; ``head_kept`` is False when the classifier had to be dropped."""

    path: str
    trunk: ScheduleViTConfig
    state: dict[str, torch.Tensor]
    head_kept: bool
    extras: dict[str, Any]


def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], ScheduleViTConfig | None, dict[str, Any]]:
    path = resolve_parent(path)  # a shipped parent's name is its checkpoint; anything else must be a file
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (pickle, zip and format errors alike)
        raise ValueError(f"invalid --parent {str(path)!r}: not a PyTorch checkpoint ({type(err).__name__})") from None
    if isinstance(state, dict) and "model" in state and "config" in state:  # tokennas train / supernet
        config = config_from_dict(state["config"])
        if config.family != "schedule_vit":
            raise ValueError(f"invalid --parent {str(path)!r}: a {config.family} checkpoint; expected a ViT/DeiT "
                             "(schedule_vit) one")
        if config.pool_after or config.share_attn or getattr(config, "keep_tokens", ()):
            raise ValueError(f"invalid --parent {str(path)!r}: its ViT pools, shares or merges tokens; a parent "
                             "must be a uniform ViT (e.g. a `tokennas train deit_tiny` checkpoint)")
        extras = dict(state.get("supernet") or {})
        if "split" in state:  # what it trained on (data.trained_split)
            extras["split"] = state["split"]
        return state["model"], config, extras
    for key in ("state_dict", "model", "state_dict_ema"):  # common wrappers of a plain state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise ValueError(f"invalid --parent {str(path)!r}: expected a tokennas checkpoint or a timm ViT/DeiT state "
                         "dict (with patch_embed.proj.weight and pos_embed)")
    if "blocks.0.mlp.fc1.weight" not in state:  # _infer reads the depth and the MLP from the blocks
        raise ValueError(f"invalid --parent {str(path)!r}: it holds no ViT blocks (no 'blocks.N.' keys); expected a "
                         "tokennas train checkpoint or a timm ViT/DeiT state dict")
    return state, None, {}


def _infer(state: dict[str, torch.Tensor]) -> ScheduleViTConfig:
    """A timm ViT/DeiT state dict's trunk. The head count is not in the weights: 64 channels per head, the
    ViT/DeiT rule (heads only group channels here, so any count inherits the same weights)."""
    proj = state["patch_embed.proj.weight"]  # (D, C, p, p)
    D, C, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    prefix = int("cls_token" in state)
    grid = round((state["pos_embed"].shape[1] - prefix) ** 0.5)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    head = state.get("head.weight")
    return ScheduleViTConfig(img_size=grid * patch, in_chans=C, num_classes=head.shape[0] if head is not None else 1,
                             patch_size=patch, embed_dim=D, depth=depth, num_heads=max(1, D // 64),
                             mlp_ratio=hidden / D, qkv_bias="blocks.0.attn.qkv.bias" in state,
                             class_token=bool(prefix))


def load_parent(path: str | Path, img_size: int, in_chans: int, num_classes: int) -> Parent:
    """Read ``--parent`` and fit it to the data with timm's own adapters: the input conv to the channels
    (``adapt_input_conv``), the positional embedding to the resolution (``resample_abs_pos_embed``); a
    classifier for other classes is dropped (``head_kept=False``: the supernet must then train). ``path`` may
    name a shipped parent (``tokennas.parents``)."""
    from timm.layers import resample_abs_pos_embed
    from timm.models import adapt_input_conv

    path = resolve_parent(path)
    state, config, extras = _read(path)
    config = config or _infer(state)
    state = dict(state)
    # timm's adapt_input_conv turns RGB weights into any channel count and sums up to 3 channels into one;
    # other weights it would pass through unchanged, and the input conv would not load
    if config.in_chans != in_chans and not (config.in_chans == 3 or (in_chans == 1 and config.in_chans < 3)):
        raise ValueError(f"invalid --parent {str(path)!r}: it takes {config.in_chans} input channel(s) but the data "
                         f"has {in_chans}; timm adapts RGB weights to any channel count, and up to 3 channels to 1")
    if config.in_chans != in_chans:
        state["patch_embed.proj.weight"] = adapt_input_conv(in_chans, state["patch_embed.proj.weight"])
    grid = img_size // config.patch_size
    if img_size % config.patch_size:
        raise ValueError(f"invalid --parent {str(path)!r}: its patch size {config.patch_size} does not divide "
                         f"--img-size {img_size}")
    prefix = int(config.class_token)
    if grid != config.grid:
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], (grid, grid), num_prefix_tokens=prefix)
    head_kept = config.num_classes == num_classes and "head.weight" in state
    if not head_kept:
        state.pop("head.weight", None)
        state.pop("head.bias", None)
    if not config.class_token:  # our trunk always holds a class-token slot; the parent's patches keep theirs
        state["pos_embed"] = torch.cat([torch.zeros_like(state["pos_embed"][:, :1]), state["pos_embed"]], dim=1)
    trunk = config.replace(img_size=img_size, in_chans=in_chans, num_classes=num_classes, class_token=True,
                           drop_path_rate=0.0)
    return Parent(str(path), trunk, state, head_kept, extras)


def build_supernet(configs: list[ScheduleViTConfig], parent: Parent | None = None) -> Supernet:
    """The supernet for a space's feasible configs: fresh (timm's ViT init), or holding a parent's weights
    (which must cover every config's width, depth and MLP)."""
    trunk, pos_stages, conv_stages = parent_config(configs)
    if parent is None:
        return Supernet(trunk, pos_stages, conv_stages)
    pos_stages = max(pos_stages, int(parent.extras.get("pos_stages", 0)))
    conv_stages = max(conv_stages, int(parent.extras.get("conv_stages", 0)))
    net = Supernet(parent.trunk, pos_stages, conv_stages)
    for config in {config_key(c): c for c in configs}.values():
        try:
            net.check(config)
        except ValueError as err:
            raise ValueError(f"invalid --parent {parent.path!r}: {err}") from None
    missing, unexpected = net.load_state_dict(parent.state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith(("fc_norm", "head_drop", "norm_pre"))]
    if unexpected:
        raise ValueError(f"invalid --parent {parent.path!r}: it holds {unexpected[0]!r}, which a ViT/DeiT trunk "
                         "does not have")
    allowed = ("head.", "stage_pos.", "pool_convs.", "cls_token")
    missing = [k for k in missing if not k.startswith(allowed)]
    if missing:
        raise ValueError(f"invalid --parent {parent.path!r}: it lacks {missing[0]!r}")
    return net


def parent_trunk(path: str | Path) -> dict[str, Any]:
    """What a parent fixes about the ``tokens`` space's trunk (read from the weights alone); ``path`` may name a
    shipped parent."""
    state, config, _ = _read(path)
    config = config or _infer(state)
    return {"embed_dim": config.embed_dim, "depth": config.depth, "num_heads": config.num_heads,
            "mlp_ratio": config.mlp_ratio, "patch_size": config.patch_size, "class_token": config.class_token}


def parent_uniform_config(path: str | Path, img_size: int | None = None) -> ScheduleViTConfig:
    """The parent's own uniform ViT (its checkpoint's config, or inferred from a timm state dict), at ``img_size``
    when given: what a budget given as a share of the parent's MACs (``--flops 50%``) is a share of."""
    state, config, _ = _read(path)
    config = config or _infer(state)
    return config.replace(img_size=img_size) if img_size else config
