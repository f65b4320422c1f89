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


def _pieces(target: str, dim: int, start: int, rows: int, fan_in: int) -> list[tuple[int, int]]:
    """(out_start, in_start) of every d × d piece of `target`'s update in the Linear holding it from output row
    `start` on (`rows` rows, `fan_in` inputs): one for q, k, v and proj, one per d rows of an fc1 (a gated MLP's
    packed or separate gate and value projections alike), one per d inputs of fc2."""
    if target == "fc2":
        return [(0, c * dim) for c in range(fan_in // dim)]
    return [(start + c * dim, 0) for c in range(rows // dim)]


def _widths(spec: BackboneSpec, i: int, target: str) -> list[tuple[int, int]]:
    """(rows, fan_in) of each Linear (or fused slice) holding `target` in block `i`."""
    d = spec.dims[i]
    if target == "fc1":
        return [(out, d) for out in spec.fc1_widths(i)]
    return [(d, spec.mlp_hidden[i] if target == "fc2" else d)]


class FactLinear(Wrapper):
    """y = base(x) + scale · Σ_pieces U · core · V applied to the piece's input slice, added to its output slice.

    Computed as three products whatever the number of pieces: V once on every d-wide chunk of the input, the
    cores as one block matrix (block (o, i) holds the core of the piece from input chunk i to output chunk o, zero
    where no piece is), U once on every d-wide chunk of the output, added to the base output in the same product.
    """

    method = "fact_tt"

    def __init__(self, base: nn.Module, factors: FactFactors, pieces: list[tuple[int, int]], scale: float):
        super().__init__(base)
        self._factors = [factors]  # a list hides the shared module from registration: it is saved once, on the model
        dim, rank = factors.fact_u.shape
        self.pieces = pieces
        self.scale = scale
        linear: Any = unwrap(base)  # the timm Linear under any wrappers
        self.out_features: int = linear.out_features
        self.in_features: int = linear.in_features
        # the weight as a grid of d × d chunks; for each chunk, row by row, the index of its piece's core (len(pieces):
        # none, a zero core), None where the pieces already cover the grid in that order (every default target set)
        self.grid = (self.out_features // dim, self.in_features // dim)
        where = {(o // dim) * self.grid[1] + i // dim: n for n, (o, i) in enumerate(pieces)}
        order = [where.get(cell, len(pieces)) for cell in range(self.grid[0] * self.grid[1])]
        self._order = None if order == list(range(len(pieces))) else order
        cores = factors.fact_u.new_empty(len(pieces), rank, rank)
        for core, (out_start, _) in zip(cores, pieces, strict=True):
            # as the official code's per-matrix Linear layers start: uniform in ±1/sqrt(fan-in), where fc2's four
            # pieces feed one output and so form one Linear of fan-in 4r
            fan_in = rank * sum(1 for o, _ in pieces if o == out_start)
            nn.init.uniform_(core, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))
        self.fact_cores = nn.Parameter(cores)

    def _blocks(self) -> torch.Tensor:
        """The cores placed on the chunk grid: (rows, columns, r, r), zero where the weight has no piece."""
        cores: torch.Tensor = self.fact_cores
        if self._order is not None:
            cores = torch.cat([cores, cores.new_zeros(1, *cores.shape[1:])])[self._order]
        return cores.view(*self.grid, *cores.shape[1:])

    def delta_weight(self) -> torch.Tensor:
        f = self._factors[0]
        d = f.fact_u.shape[0]
        rows, cols = self.grid
        # every chunk's U · core · V in one batched product, then the (rows, cols, d, d) grid laid out as the weight
        chunks = f.fact_u @ self._blocks() @ f.fact_v
        return self.scale * chunks.transpose(1, 2).reshape(rows * d, cols * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self._factors[0]
        d, rank = f.fact_u.shape
        rows, cols = self.grid
        y = self.base(x)
        # V on every input chunk: (tokens · cols, r), read as (tokens, cols · r)
        xv = (x.reshape(-1, d) @ f.fact_v.t()).reshape(-1, cols * rank)
        # all cores at once: output chunk o gets Σ_i core_(o,i) · V x_i
        core_matrix = self._blocks().transpose(1, 2).reshape(rows * rank, cols * rank)
        z = xv @ core_matrix.t()
        # U on every output chunk, added to the base output in the same product. U is passed as a contiguous r × d
        # matrix: the backward then runs its two products on the d-wide gradient as (tokens × d)·(d × r) with the
        # r × d operand transposed and as (r × tokens)·(tokens × d), several times faster on CPU than the forms a
        # transposed view of U leads to (gradient · U, gradientᵀ · z)
        out = torch.addmm(y.reshape(-1, d), z.reshape(-1, rank), f.fact_u.t().contiguous(), alpha=self.scale)
        return out.reshape(y.shape)

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
            bad = [i for i in blocks if any(w % spec.dims[i] for w in (spec.mlp_hidden[i], *spec.fc1_widths(i)))]
            first = bad[0] if bad else 0
            require_fits(not bad, self.name, f"fc1/fc2 need MLP widths divisible by the block width (blocks {bad}: "
                         f"width {spec.dims[first]}, fc1 {spec.fc1_widths(first)}, fc2 {spec.mlp_hidden[first]}); "
                         "leave fc1 and fc2 out of targets on this backbone")

    def count(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        shared = 2 * self.rank * sum({spec.dims[i] for i in blocks})
        pieces = sum(len(_pieces(t, spec.dims[i], 0, rows, fan_in)) for i in blocks for t in self.targets
                     for rows, fan_in in _widths(spec, i, t))
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
            d = spec.dims[i]
            by_path: dict[str, list[tuple[int, int]]] = {}
            for t in self.targets:
                for path, start, rows in linear_paths(model, block_path(model, i), t):
                    linear: Any = unwrap(model.get_submodule(path))
                    by_path.setdefault(path, []).extend(_pieces(t, d, start, rows, int(linear.in_features)))
            for path, pieces in by_path.items():
                wrap(model, path, lambda m, p=pieces, f=factors[d]: FactLinear(m, f, p, self.scale))
