"""Config families: one frozen dataclass per model family, a registry, presets and YAML round trip.

A config is the single encoding of a candidate architecture. It validates itself on construction
(``ValueError`` naming the field and what was allowed), serialises to YAML/JSON with a ``family``
key, and knows its own costs in closed form (``flops_by_module``, ``num_params``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import yaml

FAMILIES: dict[str, tuple[type[ModelConfig], Callable[[Any], Any]]] = {}
PRESETS: dict[str, tuple[ModelConfig, str]] = {}  # name -> (config, one-line description)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Fields every family shares. Subclasses add their architecture and implement the costs."""

    family: ClassVar[str] = ""
    img_size: int = 224  # input resolution; FLOPs are counted here
    in_chans: int = 3
    num_classes: int = 1000

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(self, f)
        for name in ("img_size", "in_chans", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}")
        for f in dataclasses.fields(self):  # sizes and counts that every family divides by or loops over
            if f.name.endswith(POSITIVE_SUFFIXES) and any(v < 1 for v in _ints(getattr(self, f.name))):
                raise ValueError(f"`{f.name}` must be positive, got {getattr(self, f.name)!r}")
        self.validate()

    def validate(self) -> None:
        """Family-specific checks; raise ValueError naming the field."""

    def replace(self, **changes: Any) -> ModelConfig:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r} for family {self.family!r}; "
                             f"expected one of: {', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, **_listify(dataclasses.asdict(self))}

    # Costs, closed form: no model is built.
    def flops_by_module(self) -> dict[str, int]:
        """Multiply-accumulates per image, keyed by the model's top-level module names."""
        raise NotImplementedError

    def num_params(self) -> int:
        raise NotImplementedError

    def tokens_per_block(self) -> dict[str, tuple[int, ...]]:
        """Tokens each block sees, per token stream (one stream for single-branch families)."""
        raise NotImplementedError


POSITIVE_SUFFIXES = ("patch_size", "img_size", "embed_dim", "depth", "num_heads", "window_size")


def _ints(value: Any) -> list[int]:
    if isinstance(value, (tuple, list)):
        return [i for v in value for i in _ints(v)]
    return [value] if isinstance(value, int) and not isinstance(value, bool) else []


def _listify(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_listify(v) for v in value]
    return value


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


_SCALARS = {"int": int, "float": (int, float), "bool": bool, "str": str}
_KIND_NAMES = {"int": ("an integer", "integers"), "float": ("a finite number", "finite numbers"),
               "bool": ("true or false", "booleans"), "str": ("a string", "strings")}


def _is_scalar(value: Any, kind: str) -> bool:
    """``value`` is a ``kind`` ("int", "float", "bool", "str"): a bool is no number, a float is finite."""
    if isinstance(value, bool) and kind != "bool":
        return False
    if not isinstance(value, _SCALARS[kind]):
        return False
    try:  # YAML's .inf and .nan, and an int too large for a float, would reach the costs
        return kind != "float" or math.isfinite(value)
    except OverflowError:
        return False


def _check_type(config: ModelConfig, field: dataclasses.Field) -> None:
    value, kind = getattr(config, field.name), str(field.type)
    if kind in _SCALARS and not _is_scalar(value, kind):
        raise ValueError(f"`{field.name}` must be {_KIND_NAMES[kind][0]}, got {value!r}")
    if kind.startswith("tuple["):  # tuple[int, ...] or tuple[float, ...]
        item = kind[len("tuple["):].split(",")[0].strip()
        if not isinstance(value, tuple) or not all(_is_scalar(v, item) for v in value):
            raise ValueError(f"`{field.name}` must be a list of {_KIND_NAMES[item][1]}, got {_listify(value)!r}")


def register_family(config_cls: type[ModelConfig], build: Callable[[Any], Any]) -> None:
    """Make a family known to ``load_config`` and ``build_model``."""
    FAMILIES[config_cls.family] = (config_cls, build)


def register_preset(name: str, config: ModelConfig, doc: str) -> None:
    """Register a named paper variant; ``models/__init__.py`` then makes every preset a timm model
    ``tokennas_<name>`` (``models/pretrained.py``)."""
    PRESETS[name] = (config, doc)


def config_from_dict(data: Any) -> ModelConfig:
    """Rebuild a config from its ``to_dict`` form, naming any bad key or value."""
    if not isinstance(data, dict):
        raise ValueError(f"a config must be a mapping with a `family` key, got {type(data).__name__}")
    data = dict(data)
    family = data.pop("family", None)
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of: {', '.join(sorted(FAMILIES))}")
    cls = FAMILIES[family][0]
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ValueError(f"unknown field {key!r} for family {family!r}; expected one of: {', '.join(names)}")
    try:
        return cls(**{k: _tuplify(v) for k, v in data.items()})
    except TypeError as err:  # e.g. an unhashable value where a scalar belongs
        raise ValueError(f"invalid config for family {family!r}: {err}") from None


def load_config(name_or_path: str | Path | ModelConfig) -> ModelConfig:
    """A preset name, a YAML/JSON file, or a config (returned as is)."""
    if isinstance(name_or_path, ModelConfig):
        return name_or_path
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key][0]
    path = Path(key)
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise ValueError(f"config file {key!r} does not exist")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as err:
            first = str(err).splitlines()[0]
            raise ValueError(f"config file {key!r} is not valid {path.suffix[1:].upper()}: {first}") from None
        return config_from_dict(data)
    raise ValueError(f"unknown preset {key!r}; expected a preset name (see `tokennas presets`) "
                     "or a .yaml/.json config file")


def save_config(config: ModelConfig, path: str | Path) -> Path:
    """Write a config as YAML (or JSON for a .json path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = config.to_dict()
    text = json.dumps(data, indent=2) if path.suffix.lower() == ".json" else yaml.safe_dump(data, sort_keys=False)
    path.write_text(text)
    return path


def build_model(name_or_config: str | Path | ModelConfig):
    """Build the ``nn.Module`` a preset, file or config describes."""
    config = load_config(name_or_config)
    return FAMILIES[config.family][1](config)


def list_presets() -> list[str]:
    return sorted(PRESETS)


def config_key(config: ModelConfig | dict[str, Any]) -> str:
    """The canonical identity of a candidate: its config (as ``to_dict`` gives it), not the parameters that built
    it. Repeats, the feasible set and the supernet's children are all keyed by it."""
    return json.dumps(config.to_dict() if isinstance(config, ModelConfig) else config, sort_keys=True)
