"""VPT-deep: `length` new learned prompt tokens at the input of each chosen block, replacing the previous ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from autopeft.backbones import BackboneSpec, block_path
from autopeft.methods._prompts import PromptedBlock, new_prompts
from autopeft.methods.base import MethodSpec, register, require, unwrap, wrap


def prompt_flops(spec: BackboneSpec, i: int, length: int) -> int:
    """Inference FLOPs that `length` extra tokens add to ViT block `i`: its projections and MLP run on them
    (2 x weights per token) and attention grows from n^2 to (n + length)^2 query-key pairs (scores and mixing)."""
    d, h, n = spec.dims[i], spec.mlp_hidden[i], spec.num_patches + spec.num_prefix_tokens
    return 2 * length * (4 * d * d + 2 * d * h) + 4 * d * ((n + length) ** 2 - n**2)


@register
@dataclass(frozen=True)
class VPTDeep(MethodSpec):
    """Visual prompt tuning, deep variant (Jia et al.)."""

    name = "vpt_deep"
    lr_range = (1e-3, 1e-2)
    category = "addition"
    families = ("vit", "eva")
    order = 60
    size_option = "length"
    sliceable = True

    length: int = 10

    def __post_init__(self) -> None:
        require(self.length >= 1, self.name, f"length must be a positive integer, got {self.length}")

    def count(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        return sum(self.length * spec.dims[i] for i in blocks)

    def overhead_flops(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        return sum(prompt_flops(spec, i, self.length) for i in blocks)

    def apply(self, model: nn.Module, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        patch_embed: Any = model.patch_embed
        proj: Any = unwrap(patch_embed.proj)  # SSF may wrap the patch embedding
        ref = proj.weight
        for i in blocks:
            prompts = new_prompts(self.length, spec.dims[i], ref)
            wrap(model, block_path(model, i),
                 lambda m, p=prompts: PromptedBlock(m, spec.num_prefix_tokens, prompts=p, strip=self.length))
