"""Foundation-model backbones (registry by name)."""

from pertadapt.models.backbones.base import Backbone
from pertadapt.models.backbones.registry import BACKBONES, build_backbone

__all__ = ["BACKBONES", "Backbone", "build_backbone"]
