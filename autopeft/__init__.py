"""autopeft: automated search over parameter-efficient fine-tuning methods for pretrained vision models.

The names below load on first use (PEP 562), so that `autopeft --help` and `--version` answer without importing
torch and timm. Importing `autopeft.backbones` (which any of these names does) registers the bundled backbone
`autopeft_tiny_vit` with timm; `import autopeft.bundled` does only that.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "AutopeftError": "autopeft.errors",
    "BackboneSpec": "autopeft.backbones",
    "backbone_spec": "autopeft.backbones",
    "create_backbone": "autopeft.backbones",
    "MethodSpec": "autopeft.methods",
    "get_method": "autopeft.methods",
    "list_methods": "autopeft.methods",
    "PeftPlan": "autopeft.plan",
}

__all__ = ["AutopeftError", "BackboneSpec", "MethodSpec", "PeftPlan", "backbone_spec", "create_backbone",
           "get_method", "list_methods", "__version__"]

if TYPE_CHECKING:
    from autopeft.backbones import BackboneSpec, backbone_spec, create_backbone
    from autopeft.errors import AutopeftError
    from autopeft.methods import MethodSpec, get_method, list_methods
    from autopeft.plan import PeftPlan


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'autopeft' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
