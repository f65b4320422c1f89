"""AdaptFormer: a scaled bottleneck parallel to the MLP: x + MLP(LN(x)) + s · up(act(down(h))).

h is LN(x) (the paper's equation, `input: norm`) or x itself (`input: residual`, what the official code runs: its
training script sets the adapter's own layer norm to none and feeds it the residual stream).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autopeft.backbones import BackboneSpec, block_path
from autopeft.errors import AutopeftError
from autopeft.methods._layers import LAYERSCALE, Bottleneck, Residual, bottleneck_params, route_outside
from autopeft.methods.base import MethodSpec, Sliceable, Wrapper, fits, register, require, wrap

INPUTS = ("norm", "residual")


class InputTap(Wrapper):
    """Runs `base` unchanged and keeps its latest input for a ParallelAdapter of the same block (no parameters)."""

    method = "adaptformer"

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.last: list[torch.Tensor] = []  # a list keeps the tensor out of the state dict

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.last[:] = [x]
        return self.base(x, *args, **kwargs)


class ParallelAdapter(Wrapper, Sliceable, Residual):
    """out = base(h) + scale · bottleneck(input) (ReLU, as in AdaptFormer); input is h or the tapped residual."""

    method = "adaptformer"

    def __init__(self, base: nn.Module, d_model: int, dim: int, scale: float, tap: InputTap | None = None):
        super().__init__(base)
        ref = next(base.parameters())
        self.adapter = Bottleneck(d_model, dim, act=nn.ReLU).to(device=ref.device, dtype=ref.dtype)
        self.scale = scale
        self._tap = [tap] if tap is not None else []  # a list: the tap is registered where it sits, not twice
        self.on, self.tapped = True, tap is not None

    def set_active(self, spec: MethodSpec | None) -> None:
        adaptformer: Any = spec
        self.on = spec is not None
        if spec is not None:
            self.adapter.width = fits(self.method, self.adapter.dim, adaptformer.dim)
            self.scale, self.tapped = adaptformer.scale, adaptformer.input == "residual"
            if self.tapped and not self._tap:
                raise AutopeftError("adaptformer: a slice with input: residual needs a module built with it")

    def sliced_state(self) -> dict[str, torch.Tensor]:
        return self.adapter.sliced_state("adapter.") if self.on else {}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.on:
            return self.base(x, *args, **kwargs)
        h = self._tap[0].last[0] if self.tapped else x
        return self.emit(self.base(x, *args, **kwargs), self.scale * self.adapter(h))


@register
@dataclass(frozen=True)
class AdaptFormer(MethodSpec):
    """Parallel MLP adapter of width `dim`, output scaled by `scale` (0.1 in the paper and the official code).

    `input: norm` (default) feeds the adapter LN(x) as the paper's equation writes it and as earlier autopeft plans
    (which carry no `input` key) were trained; `input: residual` feeds it x, as the official code does.

    `layerscale: outside` (default) adds its output to the residual stream after the block's LayerScale (DINOv2,
    DeiT-III), so γ scales neither its output nor its gradient; `inside` adds it to the sub-layer's output, which γ
    then scales. The same on a backbone without LayerScale.
    """

    name = "adaptformer"
    lr_range = (1e-3, 1e-2)
    category = "addition"
    identity_at_init = True
    order = 40
    size_option = "dim"
    sliceable = True

    dim: int = 8
    scale: float = 0.1
    input: str = "norm"
    layerscale: str = "outside"

    def __post_init__(self) -> None:
        require(self.layerscale in LAYERSCALE, self.name, f"layerscale must be {' or '.join(LAYERSCALE)}")
        require(self.dim >= 1, self.name, f"dim must be a positive integer, got {self.dim}")
        require(self.scale > 0, self.name, f"scale must be > 0, got {self.scale}")
        require(self.input in INPUTS, self.name, f"input must be {' or '.join(INPUTS)}, got {self.input!r}")

    @classmethod
    def cover_option(cls, option: str, values: tuple[Any, ...]) -> Any:
        if option == "input":  # a tap when any choice feeds the residual (a slice of `norm` does not read it)
            return "residual" if "residual" in values else values[0]
        return super().cover_option(option, values)

    def count(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        return sum(bottleneck_params(spec.dims[i], self.dim) for i in blocks)

    def overhead_flops(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        # Each bottleneck weight is one multiply-add per token; later Swin stages have 4x fewer tokens per 2x width.
        tokens = [spec.num_patches * spec.dims[0] ** 2 // spec.dims[i] ** 2 + spec.num_prefix_tokens for i in blocks]
        return sum(2 * n * self.count(spec, [i]) for n, i in zip(tokens, blocks, strict=True))

    def apply(self, model: nn.Module, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        for i in blocks:
            tap = wrap(model, f"{block_path(model, i)}.norm2", InputTap) if self.input == "residual" else None
            path = f"{block_path(model, i)}.mlp"
            new = wrap(model, path, lambda m, d=spec.dims[i], t=tap: ParallelAdapter(m, d, self.dim, self.scale, t))
            if self.layerscale == "outside":
                route_outside(model, block_path(model, i), "mlp", new)
