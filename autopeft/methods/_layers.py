"""Small building blocks shared by the addition methods."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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


def linear_paths(block_path: str, target: str) -> tuple[str, int]:
    """Module path of the Linear that holds `target` and the index of its slice (q/k/v share the fused qkv)."""
    if target in ("q", "k", "v"):
        return f"{block_path}.attn.qkv", "qkv".index(target)
    if target == "proj":
        return f"{block_path}.attn.proj", 0
    return f"{block_path}.mlp.{target}", 0


def target_shape(dim: int, hidden: int, target: str) -> tuple[int, int]:
    """(in_features, out_features) of the weight update for `target` in a block of width `dim`."""
    if target == "fc1":
        return dim, hidden
    if target == "fc2":
        return hidden, dim
    return dim, dim
