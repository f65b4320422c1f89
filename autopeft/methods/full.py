"""Full fine-tuning: every backbone parameter trains (the reference every PEFT method is measured against)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from autopeft.backbones import BackboneSpec, is_head_param
from autopeft.methods.base import MethodSpec, register


@register
@dataclass(frozen=True)
class Full(MethodSpec):
    """All parameters of the backbone are trainable."""

    name = "full"
    lr_range = (1e-4, 1e-3)
    category = "partial"
    mergeable = True
    scope = "global"
    order = 0

    def unfrozen(self, spec: BackboneSpec, blocks: Sequence[int]) -> set[tuple[str, int]]:
        return {("all", i) for i in range(spec.num_blocks)} | {("embed", 0), ("pre_norm", 0), ("final_norm", 0),
                                                           ("pool", 0)}

    def first_block(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        return -1

    def apply(self, model: nn.Module, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        for name, p in model.named_parameters():
            if not is_head_param(name):
                p.requires_grad_(True)
