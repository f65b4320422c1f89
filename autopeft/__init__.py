"""autopeft: automated search over parameter-efficient fine-tuning methods for pretrained vision models."""

from __future__ import annotations

from autopeft.backbones import BackboneSpec, backbone_spec, create_backbone
from autopeft.errors import AutopeftError
from autopeft.methods import MethodSpec, get_method, list_methods
from autopeft.plan import PeftPlan

__version__ = "0.1.0"

__all__ = [
    "AutopeftError",
    "BackboneSpec",
    "MethodSpec",
    "PeftPlan",
    "backbone_spec",
    "create_backbone",
    "get_method",
    "list_methods",
    "__version__",
]
