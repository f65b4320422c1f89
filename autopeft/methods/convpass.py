"""Convpass: a 3x3 convolutional bypass on the patch-token grid, beside the attention and beside the MLP."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autopeft.backbones import BackboneSpec, block_path
from autopeft.methods._layers import LAYERSCALE, Residual, route_outside
from autopeft.methods.base import MethodSpec, Sliceable, Wrapper, fits, register, require, wrap


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x · sigmoid(1.702 x), the CLIP-style GELU approximation Convpass's official code uses."""
    return x * torch.sigmoid(1.702 * x)


class ConvBypass(Wrapper, Sliceable, Residual):
    """out = base(h) + scale · up(act(conv3x3(act(down(h))))), act the quick GELU.

    The last grid_h·grid_w tokens are the patch grid; every token before them (class, register and prompt tokens)
    goes through the same convolution as a 1x1 map, i.e. through its centre tap, as in Convpass.
    """

    method = "convpass"

    def __init__(self, base: nn.Module, d_model: int, dim: int, scale: float, grid: tuple[int, int]):
        super().__init__(base)
        ref = next(base.parameters())
        kw: dict[str, Any] = dict(device=ref.device, dtype=ref.dtype)
        self.down = nn.Linear(d_model, dim, **kw)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, **kw)
        self.up = nn.Linear(dim, d_model, **kw)
        nn.init.xavier_uniform_(self.down.weight)  # the official code's initialisation of down and conv
        nn.init.zeros_(self.down.bias)
        nn.init.xavier_uniform_(self.conv.weight)
        assert self.conv.bias is not None  # Conv2d's bias=True default
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale
        self.grid = grid
        self.dim = self.width = dim  # width: the active width of a slice (`set_active`)
        self.on = True

    def set_active(self, spec: MethodSpec | None) -> None:
        convpass: Any = spec
        self.on = spec is not None
        if spec is not None:
            self.width, self.scale = fits(self.method, self.dim, convpass.dim), convpass.scale

    def _weights(self) -> dict[str, torch.Tensor]:
        k = self.width
        assert self.conv.bias is not None
        return {"down.weight": self.down.weight[:k], "down.bias": self.down.bias[:k],
                "conv.weight": self.conv.weight[:k, :k], "conv.bias": self.conv.bias[:k],
                "up.weight": self.up.weight[:, :k], "up.bias": self.up.bias}

    def sliced_state(self) -> dict[str, torch.Tensor]:
        return self._weights() if self.on else {}

    def _hidden(self, h: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        """The bypass up to its up-projection: act(conv3x3(act(down(h)))), (batch, tokens, width)."""
        b, n, _ = h.shape
        gh, gw = self.grid
        z = quick_gelu(F.linear(h, w["down.weight"], w["down.bias"]))
        extra = n - gh * gw
        grid = z[:, extra:].transpose(1, 2).reshape(b, -1, gh, gw)
        grid = F.conv2d(grid, w["conv.weight"], w["conv.bias"], padding=1).flatten(2).transpose(1, 2)
        if extra:
            centre = w["conv.weight"][:, :, 1, 1]
            tokens = F.linear(z[:, :extra], centre, w["conv.bias"])
            grid = torch.cat([tokens, grid], dim=1)
        return quick_gelu(grid)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        if not self.on:
            return y
        w = self._weights()
        hidden = self._hidden(x, w)
        if self.routed:  # outside LayerScale: the scaled bypass goes to the residual after it (Residual.emit)
            return self.emit(y, self.scale * F.linear(hidden, w["up.weight"], w["up.bias"]))
        hidden = hidden.reshape(-1, self.width)
        # the up-projection, its bias, the scale and the residual add as one product: the hidden units and a column of
        # ones against the up weight with the bias as one more row, contiguous (the backward's products on the d-wide
        # gradient then take the forms MKL does fast; at 224 px this halves the method's cost per block on CPU)
        hidden = torch.cat([hidden, hidden.new_ones(hidden.shape[0], 1)], dim=1)
        up = torch.cat([w["up.weight"].t(), w["up.bias"][None]])
        return torch.addmm(y.reshape(-1, y.shape[-1]), hidden, up, alpha=self.scale).reshape(y.shape)


@register
@dataclass(frozen=True)
class Convpass(MethodSpec):
    """Convolutional bypasses of width `dim` beside attention and MLP, scaled by `scale` (10 in the paper).

    `layerscale: outside` (default) adds its output to the residual stream after the block's LayerScale (DINOv2,
    DeiT-III), so γ scales neither its output nor its gradient; `inside` adds it to the sub-layer's output, which γ
    then scales. The same on a backbone without LayerScale.
    """

    name = "convpass"
    lr_range = (1e-3, 1e-2)
    category = "addition"
    families = ("vit", "eva")
    identity_at_init = True
    order = 45
    size_option = "dim"
    sliceable = True

    dim: int = 8
    scale: float = 10.0
    layerscale: str = "outside"

    def __post_init__(self) -> None:
        require(self.layerscale in LAYERSCALE, self.name, f"layerscale must be {' or '.join(LAYERSCALE)}")
        require(self.dim >= 1, self.name, f"dim must be a positive integer, got {self.dim}")
        require(self.scale > 0, self.name, f"scale must be > 0, got {self.scale}")

    def count(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        per_site = lambda d: d * self.dim + self.dim + 9 * self.dim * self.dim + self.dim + self.dim * d + d  # noqa: E731
        return sum(2 * per_site(spec.dims[i]) for i in blocks)

    def overhead_flops(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        # Every weight (down, 3x3 conv taps, up) is one multiply-add per token.
        return sum(2 * (spec.num_patches + spec.num_prefix_tokens) * self.count(spec, [i]) for i in blocks)

    def apply(self, model: nn.Module, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        for i in blocks:
            for site in ("attn", "mlp"):
                new = wrap(model, f"{block_path(model, i)}.{site}",
                           lambda m, d=spec.dims[i]: ConvBypass(m, d, self.dim, self.scale, spec.grid))
                if self.layerscale == "outside":
                    route_outside(model, block_path(model, i), site, new)
