"""Model families. Importing this package registers every family and preset (also in timm)."""

from . import quadformer, schedule_vit, supertoken  # noqa: F401
