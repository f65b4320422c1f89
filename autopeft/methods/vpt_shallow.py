"""VPT-shallow: `length` learned prompt tokens inserted after the class token before the first block."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from autopeft.backbones import BackboneSpec, block_path
from autopeft.eva import uses_rope
from autopeft.methods._prompts import PromptedBlock, new_prompts
from autopeft.methods.base import MethodSpec, register, require, unwrap, wrap
from autopeft.methods.vpt_deep import prompt_flops


@register
@dataclass(frozen=True)
class VPTShallow(MethodSpec):
    """Visual prompt tuning, shallow variant: prompts enter once and travel through every block.

    They are removed after the last block, so pooling and the head see the usual token sequence.
    """

    name = "vpt_shallow"
    lr_range = (3e-3, 3e-2)
    category = "addition"
    families = ("vit", "eva")
    scope = "global"
    order = 70  # outermost: wraps any VPT-deep wrapper of the first and last blocks
    size_option = "length"
    sliceable = True

    length: int = 10

    def __post_init__(self) -> None:
        require(self.length >= 1, self.name, f"length must be a positive integer, got {self.length}")

    def count(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        return self.length * spec.dims[0]

    def overhead_flops(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        # The prompts travel through every block.
        return sum(prompt_flops(spec, i, self.length) for i in range(spec.num_blocks))

    def apply(self, model: nn.Module, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        patch_embed: Any = model.patch_embed
        proj: Any = unwrap(patch_embed.proj)  # SSF may wrap the patch embedding
        prompts = new_prompts(self.length, spec.dims[0], proj.weight)
        first, last = 0, spec.num_blocks - 1
        offset = spec.num_prefix_tokens
        if first == last:
            wrap(model, block_path(model, first), lambda m: PromptedBlock(m, offset, prompts, strip=self.length))
            return
        wrap(model, block_path(model, first), lambda m: PromptedBlock(m, offset, prompts=prompts))
        if uses_rope(model):  # the blocks between rotate the prompts by none too (see PromptedBlock)
            for i in range(first + 1, last):
                wrap(model, block_path(model, i), lambda m: PromptedBlock(m, offset, carry=self.length))
        wrap(model, block_path(model, last), lambda m: PromptedBlock(m, offset, strip=self.length))
