"""tokennas: neural architecture search over the token schedules of vision transformers."""

from . import models  # noqa: F401  (registers every family and preset, also in timm)
from .config import ModelConfig, build_model, list_presets, load_config, save_config
from .flops import count_flops, count_params
from .patch import patch

__all__ = ["ModelConfig", "build_model", "count_flops", "count_params", "list_presets", "load_config",
           "patch", "save_config"]
__version__ = "0.1.0"
