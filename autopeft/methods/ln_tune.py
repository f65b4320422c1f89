"""LN-tune: the affine parameters of the normalisation layers of the chosen blocks train."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from autopeft.backbones import BackboneSpec, get_blocks, is_norm
from autopeft.methods.base import MethodSpec, register


@register
@dataclass(frozen=True)
class LNTune(MethodSpec):
    """LayerNorm weight and bias of norm1 and norm2 (all norms inside the block)."""

    name = "ln_tune"
    category = "partial"
    mergeable = True
    identity_at_init = True
    order = 0

    def unfrozen(self, spec: BackboneSpec, blocks: Sequence[int]) -> set[tuple[str, int]]:
        return {("norm", i) for i in blocks}

    def apply(self, model: nn.Module, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        all_blocks = get_blocks(model)
        for i in blocks:
            for m in all_blocks[i].modules():
                if is_norm(m):
                    m.requires_grad_(True)
