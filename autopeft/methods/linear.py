"""Linear probing: the backbone stays frozen; only the classifier head trains."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from autopeft.backbones import BackboneSpec
from autopeft.methods.base import MethodSpec, register


@register
@dataclass(frozen=True)
class Linear(MethodSpec):
    """Head only: zero PEFT parameters."""

    name = "linear"
    lr_range = (3e-3, 3e-2)
    category = "partial"
    mergeable = True
    identity_at_init = True
    scope = "global"
    order = 0

    def count(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        return 0

    def first_block(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        return spec.num_blocks

    def apply(self, model: nn.Module, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        return None
