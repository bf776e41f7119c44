"""What timm asks of a tokennas model, and the ``timm.create_model`` entry points.

Every family's module mixes in ``TimmModel``: a ``pretrained_cfg`` derived from its config (input size and
channels, mean/std, classes, ``first_conv``, ``classifier``), ``get_classifier`` and ``reset_classifier``. The
statistics are those of the data a model is trained on (``data.timm_data_config``): a 1-channel config is taken to
be for the embedded Fashion-MNIST, a 3-channel one for an image folder (ImageNet mean/std, timm's default crop);
a ``tokennas train`` checkpoint records the data config it was trained with, and that wins.

Entry points, both built with timm's ``build_model_with_cfg`` so that ``pretrained=True`` loads through timm's
``load_pretrained`` (which unwraps a checkpoint's ``model`` entry, adapts the input conv when ``in_chans`` differs
from the weights' and drops the classifier when ``num_classes`` does):

- ``tokennas_<preset>``: a preset, changed by keyword arguments (``img_size=32, patch_size=4, in_chans=1``).
  Weights from ``pretrained_cfg_overlay=dict(file=PATH)``: a ``tokennas train`` checkpoint (image size, channels
  and classes default to the checkpoint's) or a plain state dict (taken to fit the model being built).
- ``tokennas_config``: any config, ``config=`` a preset name, a .yaml/.json file (a run's ``best/``) or a
  ``checkpoint.pt``; with ``pretrained=True`` a checkpoint loads its own weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.models import build_model_with_cfg, register_model
from torch import nn

from ..config import FAMILIES, PRESETS, ModelConfig, build_model, config_from_dict, load_config
from ..data import EMBEDDED, timm_data_config

# Fields a checkpoint's weights do not fix: timm adapts the input conv and the classifier, or they only train.
_ADAPTABLE = ("in_chans", "num_classes", "drop_path_rate")


def pretrained_cfg_for(config: ModelConfig, data_config: dict | None = None) -> dict[str, Any]:
    """timm's pretrained_cfg for a model built from ``config``; ``data_config`` as a checkpoint recorded it."""
    data = timm_data_config(EMBEDDED if config.in_chans == 1 else "folder", config.img_size, config.in_chans)
    data.update(data_config or {})
    data["input_size"] = (config.in_chans, config.img_size, config.img_size)
    first_conv, classifier = FAMILIES[config.family][1].timm_layers(config)
    one = lambda names: names[0] if len(names) == 1 else names  # noqa: E731  (timm: a name or a tuple)
    return {**data, "fixed_input_size": True, "num_classes": config.num_classes, "first_conv": one(first_conv),
            "classifier": one(classifier), "architecture": f"tokennas_{config.family}"}


class TimmModel:
    """Mixed into every family's model, which has ``self.config`` and a ``self.head`` (a Linear or a list)."""

    config: ModelConfig
    head: nn.Module

    @classmethod
    def timm_layers(cls, config: ModelConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(first_conv, classifier): the layers that see the pixels (timm adapts them to another ``in_chans``)
        and the classifier layers (dropped when ``num_classes`` differs from the weights')."""
        return ("patch_embed.proj",), ("head",)

    def init_pretrained_cfg(self) -> None:
        """Called at the end of ``__init__``; timm's builder replaces it with the weights' own."""
        self.pretrained_cfg = pretrained_cfg_for(self.config)
        self.default_cfg = self.pretrained_cfg  # timm's older name

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for ``num_classes`` (0: none, the model returns pre-logits features)."""
        if global_pool is not None:
            raise ValueError(f"invalid global_pool {global_pool!r}; the pooling is fixed by the config")
        if num_classes < 0:
            raise ValueError(f"invalid num_classes {num_classes}; expected 0 (no classifier) or more")
        heads = list(self.head) if isinstance(self.head, nn.ModuleList) else [self.head]
        new = [nn.Linear(h.in_features, num_classes) if num_classes else _NoHead(h.in_features) for h in heads]
        self.head = nn.ModuleList(new) if isinstance(self.head, nn.ModuleList) else new[0]
        self.num_classes = num_classes
        if num_classes:
            self.config = self.config.replace(num_classes=num_classes)


class _NoHead(nn.Identity):
    """Identity that keeps its input width, so that a later ``reset_classifier`` can build a Linear again."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features


def _checkpoint(path: str | Path) -> dict | None:
    """A ``tokennas train`` checkpoint's contents, or None for a plain state dict."""
    if not Path(path).is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state if isinstance(state, dict) and "config" in state and "model" in state else None


def _model_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    size = kwargs.get("img_size")
    if isinstance(size, (tuple, list)):  # timm passes (H, W) from the pretrained_cfg's input_size
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"invalid img_size {tuple(size)}; tokennas models take square images")
        kwargs = {**kwargs, "img_size": int(size[0])}
    return kwargs


def _builder(config: ModelConfig, weights: ModelConfig | None):
    """The model class for timm's builder: ``config`` changed by the keyword arguments timm settles on."""

    def build(**kwargs: Any) -> nn.Module:
        final = config.replace(**_model_kwargs(kwargs))
        if weights is not None:
            trained, asked = weights.to_dict(), final.to_dict()
            differ = [f for f, v in asked.items() if f not in _ADAPTABLE and trained[f] != v]
            if differ:
                raise ValueError(f"the checkpoint was trained with {', '.join(f'{f}={trained[f]!r}' for f in differ)}"
                                 f" but the model asked for has {', '.join(f'{f}={asked[f]!r}' for f in differ)}; "
                                 "pass those as keyword arguments, or use timm.create_model('tokennas_config', "
                                 "config=CHECKPOINT, pretrained=True)")
        return build_model(final)

    return build


def create(variant: str, config: ModelConfig | None, pretrained: bool = False, pretrained_cfg: Any = None,
           pretrained_cfg_overlay: dict | None = None, checkpoint: dict | None = None, cache_dir: Any = None,
           **kwargs: Any) -> nn.Module:
    """Build ``config`` changed by ``kwargs`` with timm's ``build_model_with_cfg``; ``checkpoint``: where the
    weights are when it is a tokennas checkpoint (otherwise read from the overlay's ``file`` when it is one)."""
    overlay = dict(pretrained_cfg_overlay or {})
    if pretrained and checkpoint is None and overlay.get("file"):
        checkpoint = _checkpoint(overlay["file"])
    config = config or (config_from_dict(checkpoint["config"]) if checkpoint else None)
    weights = config_from_dict(checkpoint["config"]) if checkpoint and pretrained else None
    if config is None:
        raise ValueError("tokennas_config needs config=PATH: a preset name, a .yaml/.json config or a checkpoint.pt")
    if not isinstance(pretrained_cfg, dict):  # timm passes None, or a tag name that means nothing here
        source = weights or config.replace(**_model_kwargs(kwargs))
        pretrained_cfg = pretrained_cfg_for(source, checkpoint and checkpoint.get("data_config"))
    if pretrained and not any(overlay.get(k) or pretrained_cfg.get(k) for k in ("file", "state_dict", "url")):
        raise ValueError(f"{variant} ships no weights; pass pretrained_cfg_overlay=dict(file=PATH) with a "
                         "tokennas checkpoint.pt or a state dict")
    return build_model_with_cfg(_builder(config, weights), variant, pretrained, pretrained_cfg=pretrained_cfg,
                                pretrained_cfg_overlay=overlay, cache_dir=cache_dir, **kwargs)


def register_timm_presets() -> None:
    """Every preset of ``config.PRESETS`` as ``timm.create_model("tokennas_<name>", ...)`` (once each)."""
    from timm.models import is_model

    for name, (config, doc) in PRESETS.items():
        if not is_model(f"tokennas_{name}"):
            register_timm_preset(name, config, doc)


def register_timm_preset(name: str, config: ModelConfig, doc: str) -> None:
    """``timm.create_model("tokennas_<name>", ...)``."""

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create(f"tokennas_{name}", config, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = f"tokennas_{name}"
    entrypoint.__doc__ = doc
    entrypoint.__module__ = type(config).__module__
    register_model(entrypoint)


@register_model
def tokennas_config(pretrained: bool = False, config: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """Any tokennas config: ``config=`` a preset name, a .yaml/.json file or a ``tokennas train`` checkpoint.pt
    (with ``pretrained=True`` its weights load too)."""
    if config is None or Path(config).suffix not in (".pt", ".pth"):
        return create("tokennas_config", load_config(config) if config else None, pretrained, **kwargs)
    checkpoint = _checkpoint(config)
    if checkpoint is None:
        raise ValueError(f"{str(config)!r} is not a tokennas checkpoint (expected `model` and `config` entries)")
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if pretrained:
        overlay.setdefault("file", str(config))
    return create("tokennas_config", config_from_dict(checkpoint["config"]), pretrained,
                  pretrained_cfg_overlay=overlay, checkpoint=checkpoint, **kwargs)
