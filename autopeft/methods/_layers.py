"""Small building blocks shared by the addition methods."""

from __future__ import annotations

import math

import torch
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


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
