"""AdaptFormer: a scaled bottleneck parallel to the MLP: x + MLP(LN(x)) + s · up(act(down(LN(x))))."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from autopeft.backbones import BackboneSpec, block_path
from autopeft.methods._layers import Bottleneck, bottleneck_params
from autopeft.methods.base import MethodSpec, Wrapper, register, require, wrap


class ParallelAdapter(Wrapper):
    """out = base(h) + scale · bottleneck(h) (ReLU, as in AdaptFormer)."""

    method = "adaptformer"

    def __init__(self, base: nn.Module, d_model: int, dim: int, scale: float):
        super().__init__(base)
        ref = next(base.parameters())
        self.adapter = Bottleneck(d_model, dim, act=nn.ReLU).to(device=ref.device, dtype=ref.dtype)
        self.scale = scale

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base(x, *args, **kwargs) + self.scale * self.adapter(x)


@register
@dataclass(frozen=True)
class AdaptFormer(MethodSpec):
    """Parallel MLP adapter of width `dim`, output scaled by `scale` (0.1 in the paper)."""

    name = "adaptformer"
    category = "addition"
    identity_at_init = True
    order = 40
    size_option = "dim"

    dim: int = 8
    scale: float = 0.1

    def __post_init__(self):
        require(self.dim >= 1, self.name, f"dim must be a positive integer, got {self.dim}")
        require(self.scale > 0, self.name, f"scale must be > 0, got {self.scale}")

    def count(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        return sum(bottleneck_params(spec.dims[i], self.dim) for i in blocks)

    def overhead_flops(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        # Each bottleneck weight is one multiply-add per token; later Swin stages have 4x fewer tokens per 2x width.
        tokens = [spec.num_patches * spec.dims[0] ** 2 // spec.dims[i] ** 2 + spec.num_prefix_tokens for i in blocks]
        return sum(2 * n * self.count(spec, [i]) for n, i in zip(tokens, blocks, strict=True))

    def apply(self, model: nn.Module, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        for i in blocks:
            path = f"{block_path(model, i)}.mlp"
            wrap(model, path, lambda m, d=spec.dims[i]: ParallelAdapter(m, d, self.dim, self.scale))
