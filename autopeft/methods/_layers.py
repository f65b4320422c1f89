"""Small building blocks shared by the addition methods."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.eva import EvaBlock
from torch import nn

from autopeft.backbones import BackboneSpec, linear_sites
from autopeft.eva import qkv_as_module


class Bottleneck(nn.Module):
    """down (d_model -> dim) -> activation -> up (dim -> d_model); the up-projection starts at zero."""

    def __init__(self, d_model: int, dim: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.down = nn.Linear(d_model, dim)
        self.act = act()
        self.up = nn.Linear(dim, d_model)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

        self.dim = self.width = dim  # width: the bottleneck's active width (a slice, see `methods.base.Sliceable`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width == self.dim:
            return self.up(self.act(self.down(x)))
        k = self.width
        h = self.act(F.linear(x, self.down.weight[:k], self.down.bias[:k]))
        return F.linear(h, self.up.weight[:, :k], self.up.bias)

    def sliced_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The first `width` units' parameters, named as a Bottleneck of that width names them under `prefix`."""
        k = self.width
        return {f"{prefix}down.weight": self.down.weight[:k], f"{prefix}down.bias": self.down.bias[:k],
                f"{prefix}up.weight": self.up.weight[:, :k], f"{prefix}up.bias": self.up.bias}


def bottleneck_params(d_model: int, dim: int) -> int:
    return 2 * d_model * dim + dim + d_model


def linear_paths(model: nn.Module, block_path: str, target: str) -> list[tuple[str, int, int]]:
    """(module path, first output row, rows) of each Linear of block `block_path` that holds `target`: a slice of
    the fused qkv for q, k and v (or their own projections), both of SwiGLU's input projections for fc1.

    A fused qkv's attention is made to call it as a module (Eva adds its q/v biases beside it otherwise)."""
    block = model.get_submodule(block_path)
    sites = linear_sites(block, target)
    if any(path == "attn.qkv" for path, _, _ in sites):
        qkv_as_module(model.get_submodule(f"{block_path}.attn"))
    return [(f"{block_path}.{path}", start, rows) for path, start, rows in sites]


def target_shapes(spec: BackboneSpec, i: int, target: str) -> list[tuple[int, int]]:
    """(in_features, out_features) of each weight update for `target` in block `i` (two for SwiGLU's fc1)."""
    dim, hidden = spec.dims[i], spec.mlp_hidden[i]
    if target == "fc1":
        return [(dim, out) for out in spec.fc1_widths(i)]
    if target == "fc2":
        return [(hidden, dim)]
    return [(dim, dim)]


# -- LayerScale: where an addition method's output joins the residual stream ------------------------------------------

LAYERSCALE = ("outside", "inside")
_LS_OF = {"attn": "ls1", "mlp": "ls2"}


class Residual:
    """Mixin of a wrapper around a block's `attn` or `mlp` that adds a delta to its output (adapter, AdaptFormer,
    Convpass). Routed (`route_outside`), the delta is set aside for the block's LayerScale wrapper, which adds it
    after scaling the sub-layer's output: it joins the residual stream unscaled by γ, as the papers place it
    relative to the block's output (their backbones have no LayerScale)."""

    routed: bool = False
    pending: list[torch.Tensor]

    def emit(self, out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.routed:
            self.pending[:] = [delta]
            return out
        return out + delta


class OutsideLayerScale(nn.Module):
    """ls(x) + the deltas its sub-layer's Residual wrappers set aside in this forward (no parameters of its own)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.sources: list[Residual] = []  # a plain list: the wrappers are registered where they sit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for source in self.sources:
            if source.pending:
                out = out + source.pending.pop()
        return out


_GAMMA_OF = {"attn": "gamma_1", "mlp": "gamma_2"}


class OutsideGammaBlock(EvaBlock):
    """timm's EvaBlock, whose LayerScale is a parameter it multiplies by (`gamma_1`, `gamma_2`: DINOv3, the rope
    ViTs), adding after γ the deltas its sub-layers' Residual wrappers set aside (`sources`, per site). A block's
    class is switched to it in place (`route_outside`): its parameters, names and weights stay as they are."""

    sources: dict[str, list[Residual]]

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        x_attn = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        if self.gamma_1 is not None:
            x_attn = _plus_pending(self.gamma_1 * x_attn, self.sources["attn"])
        x = x + self.drop_path1(x_attn)
        x_mlp = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            x_mlp = _plus_pending(self.gamma_2 * x_mlp, self.sources["mlp"])
        return x + self.drop_path2(x_mlp)


def _plus_pending(out: torch.Tensor, sources: list[Residual]) -> torch.Tensor:
    for source in sources:
        if source.pending:
            out = out + source.pending.pop()
    return out


def has_layerscale(model: nn.Module, block: str, site: str) -> bool:
    """Whether the block scales `site`'s output per channel (DINOv2, DeiT-III, CaiT-style `ls1`/`ls2`; Eva's
    `gamma_1`/`gamma_2` parameters)."""
    b = model.get_submodule(block)
    ls = getattr(b, _LS_OF[site], None)
    if isinstance(ls, nn.Module) and not isinstance(ls, nn.Identity):
        return True
    return isinstance(b, EvaBlock) and isinstance(getattr(b, _GAMMA_OF[site], None), nn.Parameter)


def route_outside(model: nn.Module, block: str, site: str, wrapper: nn.Module) -> None:
    """Make `wrapper` (a Residual around `block.site`) add its delta after the block's LayerScale; nothing where the
    block has none."""
    if not isinstance(wrapper, Residual):
        raise TypeError(f"{type(wrapper).__name__} does not set its output aside (not a Residual)")
    if not has_layerscale(model, block, site):
        return
    wrapper.routed, wrapper.pending = True, []
    b = model.get_submodule(block)
    if isinstance(b, EvaBlock):
        routed: Any = b
        if not isinstance(b, OutsideGammaBlock):
            if type(b) is not EvaBlock:
                raise TypeError(f"{type(b).__name__}: only timm's EvaBlock is known to scale by gamma_1/gamma_2")
            routed.__class__ = OutsideGammaBlock
            routed.sources = {"attn": [], "mlp": []}
        routed.sources[site].append(wrapper)
        return
    path = f"{block}.{_LS_OF[site]}"
    ls = model.get_submodule(path)
    if not isinstance(ls, OutsideLayerScale):
        ls = OutsideLayerScale(ls)
        parent = model.get_submodule(block)
        setattr(parent, _LS_OF[site], ls)
    ls.sources.append(wrapper)
