"""Model families. Importing this package registers every family and preset (also in timm)."""

from . import crossvit, quadformer, schedule_vit, supertoken  # noqa: F401
from .pretrained import register_timm_presets

register_timm_presets()
