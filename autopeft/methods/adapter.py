"""Adapter (Houlsby / Pfeiffer): a sequential bottleneck after the attention and/or MLP output, inside the residual."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autopeft.backbones import BackboneSpec, block_path
from autopeft.methods._layers import LAYERSCALE, Bottleneck, Residual, bottleneck_params, route_outside
from autopeft.methods.base import MethodSpec, Sliceable, Wrapper, fits, register, require, wrap

POSITIONS = {"mlp": ("mlp",), "attn": ("attn",), "both": ("attn", "mlp")}


class SequentialAdapter(Wrapper, Sliceable, Residual):
    """out = base(x); out + up(act(down(out))). `site`: the sub-layer it follows (`attn` or `mlp`)."""

    method = "adapter"

    def __init__(self, base: nn.Module, d_model: int, dim: int, site: str = "mlp"):
        super().__init__(base)
        ref = next(base.parameters())
        self.adapter = Bottleneck(d_model, dim).to(device=ref.device, dtype=ref.dtype)
        self.site, self.on = site, True

    def set_active(self, spec: MethodSpec | None) -> None:
        adapter: Any = spec
        self.on = spec is not None and self.site in POSITIONS[adapter.position]
        if self.on:
            self.adapter.width = fits(self.method, self.adapter.dim, adapter.dim)

    def sliced_state(self) -> dict[str, torch.Tensor]:
        return self.adapter.sliced_state("adapter.") if self.on else {}

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base(*args, **kwargs)
        return self.emit(out, self.adapter(out)) if self.on else out


@register
@dataclass(frozen=True)
class Adapter(MethodSpec):
    """Bottleneck adapter of width `dim` after the MLP (Pfeiffer), the attention, or both (Houlsby).

    `layerscale: outside` (default) adds its output to the residual stream after the block's LayerScale (DINOv2,
    DeiT-III), so γ scales neither its output nor its gradient; `inside` adds it to the sub-layer's output, which γ
    then scales. The same on a backbone without LayerScale.
    """

    name = "adapter"
    lr_range = (6e-4, 6e-3)
    category = "addition"
    identity_at_init = True
    order = 40
    size_option = "dim"
    sliceable = True

    dim: int = 8
    position: str = "mlp"
    layerscale: str = "outside"

    def __post_init__(self) -> None:
        require(self.layerscale in LAYERSCALE, self.name, f"layerscale must be {' or '.join(LAYERSCALE)}")
        require(self.dim >= 1, self.name, f"dim must be a positive integer, got {self.dim}")
        require(self.position in POSITIONS, self.name, f"position must be one of {', '.join(POSITIONS)}")

    @classmethod
    def cover_option(cls, option: str, values: tuple[Any, ...]) -> Any:
        if option == "position":  # after every sub-layer any choice puts it
            sites = {site for v in values for site in POSITIONS[v]}
            return next(p for p, s in POSITIONS.items() if set(s) == sites)
        return super().cover_option(option, values)

    def count(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        return sum(bottleneck_params(spec.dims[i], self.dim) * len(POSITIONS[self.position]) for i in blocks)

    def overhead_flops(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        # Each bottleneck weight is one multiply-add per token; later Swin stages have 4x fewer tokens per 2x width.
        tokens = [spec.num_patches * spec.dims[0] ** 2 // spec.dims[i] ** 2 + spec.num_prefix_tokens for i in blocks]
        return sum(2 * n * self.count(spec, [i]) for n, i in zip(tokens, blocks, strict=True))

    def apply(self, model: nn.Module, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        for i in blocks:
            for site in POSITIONS[self.position]:
                path = f"{block_path(model, i)}.{site}"
                new = wrap(model, path, lambda m, d=spec.dims[i], s=site: SequentialAdapter(m, d, self.dim, s))
                if self.layerscale == "outside":
                    route_outside(model, block_path(model, i), site, new)
