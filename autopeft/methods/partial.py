"""Partial-k: the last k blocks, the final norm and an attention-pool head after them (SigLIP's) are fully
trainable."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from autopeft.backbones import BackboneSpec, final_norm_modules, get_blocks, pool_modules
from autopeft.methods.base import MethodSpec, register, require, require_fits


@register
@dataclass(frozen=True)
class Partial(MethodSpec):
    """Fine-tune the last `k` blocks and what follows them before the classifier (the norm, an attention pool)."""

    name = "partial"
    lr_range = (1e-4, 1e-3)
    category = "partial"
    mergeable = True
    scope = "global"
    order = 0
    size_option = "k"

    k: int = 1

    def __post_init__(self) -> None:
        require(self.k >= 1, self.name, f"k must be a positive integer, got {self.k}")

    def check(self, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        super().check(spec, blocks)
        require_fits(self.k <= spec.num_blocks, self.name,
                     f"k={self.k} exceeds the {spec.num_blocks} blocks of {spec.name}")

    def unfrozen(self, spec: BackboneSpec, blocks: Sequence[int]) -> set[tuple[str, int]]:
        return {("all", i) for i in range(spec.num_blocks - self.k, spec.num_blocks)} | {("final_norm", 0), ("pool", 0)}

    def first_block(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        return spec.num_blocks - self.k

    def apply(self, model: nn.Module, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        for block in get_blocks(model)[spec.num_blocks - self.k :]:
            block.requires_grad_(True)
        for module in final_norm_modules(model) + pool_modules(model):
            module.requires_grad_(True)
