"""FacT-TT: the weight updates of all chosen blocks as one tensor, factorised as U · Σ_(block, matrix) · V.

U (d × r) and V (r × d) are shared by every block of the same width; each d × d piece of each targeted matrix of each
block has its own r × r core. MLP matrices (d × 4d) are split into d × d pieces, as in FacT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autopeft.backbones import BackboneSpec, block_path
from autopeft.methods._layers import linear_paths
from autopeft.methods.base import (
    MethodSpec,
    Wrapper,
    check_targets,
    merged_base,
    register,
    require,
    require_fits,
    unwrap,
    wrap,
)

SHARED_ATTR = "autopeft_shared"


class FactFactors(nn.Module):
    """The factors shared across blocks: U starts at zero so the model is unchanged at initialisation.

    U is the output side (the official code's zero-initialised FacTv), V the input side (its FacTu, a Linear's
    default uniform initialisation).
    """

    def __init__(self, dim: int, rank: int, like: torch.Tensor):
        super().__init__()
        self.fact_u = nn.Parameter(like.new_zeros(dim, rank))
        self.fact_v = nn.Parameter(like.new_empty(rank, dim))
        nn.init.kaiming_uniform_(self.fact_v, a=math.sqrt(5))


def _pieces(target: str, dim: int, hidden: int) -> list[tuple[int, int]]:
    """(out_start, in_start) of every d × d piece of `target`'s weight."""
    if target in ("q", "k", "v"):
        return [("qkv".index(target) * dim, 0)]
    if target == "fc1":
        return [(c * dim, 0) for c in range(hidden // dim)]
    if target == "fc2":
        return [(0, c * dim) for c in range(hidden // dim)]
    return [(0, 0)]


class FactLinear(Wrapper):
    """y = base(x) + scale · Σ_pieces U · core · V applied to the piece's input slice, added to its output slice."""

    method = "fact_tt"

    def __init__(self, base: nn.Module, factors: FactFactors, pieces: list[tuple[int, int]], scale: float):
        super().__init__(base)
        self._factors = [factors]  # a list hides the shared module from registration: it is saved once, on the model
        rank = factors.fact_u.shape[1]
        self.pieces = pieces
        self.scale = scale
        linear: Any = unwrap(base)  # the timm Linear under any wrappers
        self.out_features: int = linear.out_features
        cores = factors.fact_u.new_empty(len(pieces), rank, rank)
        for core, (out_start, _) in zip(cores, pieces, strict=True):
            # as the official code's per-matrix Linear layers start: uniform in ±1/sqrt(fan-in), where fc2's four
            # pieces feed one output and so form one Linear of fan-in 4r
            fan_in = rank * sum(1 for o, _ in pieces if o == out_start)
            nn.init.uniform_(core, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))
        self.fact_cores = nn.Parameter(cores)

    def delta_weight(self) -> torch.Tensor:
        f = self._factors[0]
        d = f.fact_u.shape[0]
        linear: Any = unwrap(self.base)
        delta = torch.zeros_like(linear.weight)
        for core, (o, i) in zip(self.fact_cores, self.pieces, strict=True):
            delta[o : o + d, i : i + d] += self.scale * (f.fact_u @ core @ f.fact_v)
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self._factors[0]
        d = f.fact_u.shape[0]
        y = self.base(x)
        delta = x.new_zeros(*x.shape[:-1], self.out_features)
        for core, (o, i) in zip(self.fact_cores, self.pieces, strict=True):
            delta[..., o : o + d] += ((x[..., i : i + d] @ f.fact_v.t()) @ core.t()) @ f.fact_u.t()
        return y + self.scale * delta

    @torch.no_grad()
    def merged(self) -> nn.Module:
        base: Any = merged_base(self)  # the plain Linear
        base.weight += self.delta_weight().to(base.weight.dtype)
        return base


@register
@dataclass(frozen=True)
class FacTTT(MethodSpec):
    """FacT tensor-train (Jie & Deng): shared U, V of rank `rank`, per-block cores, output scaled by `scale`."""

    name = "fact_tt"
    lr_range = (3e-4, 3e-3)
    category = "partial"
    mergeable = True
    identity_at_init = True
    order = 15
    size_option = "rank"

    rank: int = 8
    scale: float = 1.0
    targets: tuple[str, ...] = ("q", "k", "v", "proj", "fc1", "fc2")  # every matrix of the block, as in FacT

    def __post_init__(self) -> None:
        require(self.rank >= 1, self.name, f"rank must be a positive integer, got {self.rank}")
        require(self.scale > 0, self.name, f"scale must be > 0, got {self.scale}")
        check_targets(self.name, self.targets)

    def check(self, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        super().check(spec, blocks)
        if {"fc1", "fc2"} & set(self.targets):
            bad = [i for i in blocks if spec.mlp_hidden[i] % spec.dims[i]]
            require_fits(not bad, self.name, f"fc1/fc2 need an MLP width divisible by the block width (blocks {bad})")

    def count(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        shared = 2 * self.rank * sum({spec.dims[i] for i in blocks})
        pieces = sum(len(_pieces(t, spec.dims[i], spec.mlp_hidden[i])) for i in blocks for t in self.targets)
        return shared + pieces * self.rank * self.rank

    def apply(self, model: nn.Module, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        if not hasattr(model, SHARED_ATTR):
            model.add_module(SHARED_ATTR, nn.ModuleDict())
        shared: nn.ModuleDict = getattr(model, SHARED_ATTR)
        group = sum(1 for k in shared if k.startswith(self.name))
        patch_embed: Any = model.patch_embed
        proj: Any = unwrap(patch_embed.proj)  # SSF may wrap the patch embedding
        like = proj.weight
        factors: dict[int, FactFactors] = {}
        for d in sorted({spec.dims[i] for i in blocks}):
            factors[d] = FactFactors(d, self.rank, like)
            shared[f"{self.name}{group}_d{d}"] = factors[d]
        for i in blocks:
            d, h = spec.dims[i], spec.mlp_hidden[i]
            by_path: dict[str, list[tuple[int, int]]] = {}
            for t in self.targets:
                path, _ = linear_paths(block_path(model, i), t)
                by_path.setdefault(path, []).extend(_pieces(t, d, h))
            for path, pieces in by_path.items():
                wrap(model, path, lambda m, p=pieces, f=factors[d]: FactLinear(m, f, p, self.scale))
