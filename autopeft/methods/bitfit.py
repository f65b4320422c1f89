"""BitFit: the bias terms of the chosen blocks train."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from autopeft.backbones import BackboneSpec, get_blocks
from autopeft.methods.base import MethodSpec, register


@register
@dataclass(frozen=True)
class BitFit(MethodSpec):
    """Every parameter named `*bias` inside the block (qkv, proj, fc1, fc2 and the norms) is trainable."""

    name = "bitfit"
    lr_range = (1e-3, 1e-2)
    category = "partial"
    mergeable = True
    identity_at_init = True
    order = 0

    def unfrozen(self, spec: BackboneSpec, blocks: Sequence[int]) -> set[tuple[str, int]]:
        return {("bias", i) for i in blocks}

    def apply(self, model: nn.Module, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        all_blocks = get_blocks(model)
        for i in blocks:
            for name, p in all_blocks[i].named_parameters():
                if name.endswith("bias"):
                    p.requires_grad_(True)
