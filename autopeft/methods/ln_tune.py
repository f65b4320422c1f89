"""LN-tune: the affine parameters of the normalisation layers of the chosen blocks (with block 0, of the norm before
it, CLIP's `norm_pre`; with the last block, of the final norm) train."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from autopeft.backbones import BackboneSpec, final_norm_modules, get_blocks, is_norm, pool_modules, pre_norm_modules
from autopeft.methods.base import MethodSpec, register


@register
@dataclass(frozen=True)
class LNTune(MethodSpec):
    """LayerNorm weight and bias of norm1 and norm2 (all norms inside the block); the norm before block 0 (CLIP's
    `norm_pre`) with block 0, the final norm and the norms of an attention-pool head (SigLIP's) with the last block.

    Every LayerNorm of the backbone trains when all blocks are chosen, as PETL_Vision's LN tuning counts it
    (38,400 on ViT-B/16).
    """

    name = "ln_tune"
    lr_range = (3e-4, 3e-3)
    category = "partial"
    mergeable = True
    identity_at_init = True
    order = 0

    def unfrozen(self, spec: BackboneSpec, blocks: Sequence[int]) -> set[tuple[str, int]]:
        final = {("final_norm", 0), ("pool_norm", 0)} if spec.num_blocks - 1 in blocks else set()
        pre = {("pre_norm", 0)} if 0 in blocks and spec.pre_norm_params else set()
        return {("norm", i) for i in blocks} | final | pre

    def first_block(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        return -1 if 0 in blocks and spec.pre_norm_params else super().first_block(spec, blocks)

    def apply(self, model: nn.Module, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        all_blocks = get_blocks(model)
        for i in blocks:
            for m in all_blocks[i].modules():
                if is_norm(m):
                    m.requires_grad_(True)
        if spec.num_blocks - 1 in blocks:
            for norm in final_norm_modules(model):
                norm.requires_grad_(True)
            for m in (m for pool in pool_modules(model) for m in pool.modules() if is_norm(m)):
                m.requires_grad_(True)
        if 0 in blocks:
            for norm in pre_norm_modules(model):
                norm.requires_grad_(True)
