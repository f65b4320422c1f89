"""LoRA: a low-rank update B·A on chosen projections; on timm's fused qkv only the chosen slices are updated."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autopeft.backbones import BackboneSpec, block_path
from autopeft.methods._layers import linear_paths, target_shapes
from autopeft.methods.base import (
    TARGET_LAYERS,
    MethodSpec,
    Sliceable,
    Wrapper,
    check_targets,
    fits,
    merged_base,
    register,
    require,
    unwrap,
    wrap,
)


class LoraLinear(Wrapper, Sliceable):
    """y = base(x) + scale · B_t A_t x on the output slice of each target t.

    `slices` maps a target name to the (start, size) of its rows in the base weight (the whole weight for an
    unfused Linear). Sliced (`set_active`), it runs the first `rank` rows of A and columns of B of the active
    spec's targets at its scale.
    """

    method = "lora"

    def __init__(self, base: nn.Module, slices: dict[str, tuple[int, int]], rank: int, scale: float):
        super().__init__(base)
        linear: Any = unwrap(base)  # the timm Linear under any wrappers
        self.slices = dict(sorted(slices.items(), key=lambda kv: kv[1][0]))
        self.out_features: int = linear.out_features
        self.scale = scale
        self.rank = rank
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for t, (_, size) in self.slices.items():
            a = torch.empty(rank, linear.in_features, device=linear.weight.device, dtype=linear.weight.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[t] = nn.Parameter(a)
            self.lora_B[t] = nn.Parameter(a.new_zeros(size, rank))
        self.active: tuple[str, ...] = tuple(self.slices)  # the targets that run, at rank `r`
        self.r = rank

    def set_active(self, spec: MethodSpec | None) -> None:
        lora: Any = spec
        self.active = () if spec is None else tuple(t for t in self.slices if t in lora.targets)
        if spec is not None:
            self.r, self.scale = fits(self.method, self.rank, lora.rank), lora.scale

    def sliced_state(self) -> dict[str, torch.Tensor]:
        return {**{f"lora_A.{t}": self.lora_A[t][: self.r] for t in self.active},
                **{f"lora_B.{t}": self.lora_B[t][:, : self.r] for t in self.active}}

    def delta_weight(self) -> torch.Tensor:
        linear: Any = unwrap(self.base)
        delta = torch.zeros_like(linear.weight)
        for t in self.active:
            start, size = self.slices[t]
            delta[start : start + size] = self.scale * (self.lora_B[t][:, : self.r] @ self.lora_A[t][: self.r])
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.active:
            return y
        r = self.r
        # every active target's A at once: (tokens, targets · r)
        a = torch.cat([self.lora_A[t][:r] for t in self.active])
        xa = x.reshape(-1, x.shape[-1]) @ a.t()
        # B of every target as one contiguous (targets · r) × out matrix, zero outside the target's output slice
        # (contiguous, also for one target: the backward's products on the out-wide gradient then take the forms MKL
        # does fast, several times faster on CPU than those a transposed view of B leads to)
        rows = []
        for t in self.active:
            start, size = self.slices[t]
            bt = self.lora_B[t][:, :r].t()
            if size < self.out_features:
                bt = torch.cat([bt.new_zeros(r, start), bt, bt.new_zeros(r, self.out_features - start - size)], dim=1)
            rows.append(bt)
        b = torch.cat(rows)
        # added to the base output in the same product
        return torch.addmm(y.reshape(-1, self.out_features), xa, b, alpha=self.scale).reshape(y.shape)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        base: Any = merged_base(self)  # the plain Linear
        base.weight += self.delta_weight().to(base.weight.dtype)
        return base


@register
@dataclass(frozen=True)
class LoRA(MethodSpec):
    """Low-rank adaptation (Hu et al.): ΔW = (alpha / rank) · B·A with A random and B zero at start."""

    name = "lora"
    lr_range = (3e-4, 3e-3)
    category = "partial"
    mergeable = True
    identity_at_init = True
    order = 10
    size_option = "rank"
    sliceable = True

    rank: int = 4
    alpha: float = 0.0  # 0 means alpha = rank (scale 1)
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        require(self.rank >= 1, self.name, f"rank must be a positive integer, got {self.rank}")
        require(self.alpha >= 0, self.name, f"alpha must be >= 0, got {self.alpha}")
        check_targets(self.name, self.targets)

    @classmethod
    def cover_option(cls, option: str, values: tuple[Any, ...]) -> Any:
        if option == "targets":  # every target any choice names
            return tuple(t for t in TARGET_LAYERS if any(t in v for v in values))
        return super().cover_option(option, values)

    @property
    def scale(self) -> float:
        return (float(self.alpha) if self.alpha else float(self.rank)) / float(self.rank)

    def count(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        total = 0
        for i in blocks:
            for t in self.targets:
                total += sum(self.rank * (fan_in + fan_out) for fan_in, fan_out in target_shapes(spec, i, t))
        return total

    def apply(self, model: nn.Module, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        for i in blocks:
            by_path: dict[str, dict[str, tuple[int, int]]] = {}
            for t in self.targets:
                for path, start, rows in linear_paths(model, block_path(model, i), t):
                    by_path.setdefault(path, {})[t] = (start, rows)
            for path, slices in by_path.items():
                wrap(model, path, lambda m, s=slices: LoraLinear(m, s, self.rank, self.scale))
