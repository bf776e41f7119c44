"""Model families. Importing this package registers every family and preset (also in timm)."""

from . import crossvit, quadformer, schedule_vit, supertoken  # noqa: F401
