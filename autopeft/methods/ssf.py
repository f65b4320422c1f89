"""SSF: per-channel scale and shift after qkv, proj, fc1, fc2 and both norms of each block."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from autopeft.backbones import BackboneSpec, block_path
from autopeft.errors import AutopeftError
from autopeft.methods.base import MethodSpec, Wrapper, merged_base, register, require, unwrap, wrap

SSF_SITES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2")


class ScaleShift(Wrapper):
    """y = base(x) · γ + β over the last dimension."""

    method = "ssf"

    def __init__(self, base: nn.Module, channels: int, init: str):
        super().__init__(base)
        ref = next(unwrap(base).parameters())
        self.ssf_scale = nn.Parameter(torch.ones(channels, device=ref.device, dtype=ref.dtype))
        self.ssf_shift = nn.Parameter(torch.zeros(channels, device=ref.device, dtype=ref.dtype))
        if init == "normal":
            nn.init.normal_(self.ssf_scale, mean=1.0, std=0.02)
            nn.init.normal_(self.ssf_shift, std=0.02)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.base(*args, **kwargs) * self.ssf_scale + self.ssf_shift

    @torch.no_grad()
    def merged(self) -> nn.Module:
        base = merged_base(self)
        weight, bias = getattr(base, "weight", None), getattr(base, "bias", None)
        if weight is None or bias is None:
            raise AutopeftError(f"ssf cannot merge into {type(base).__name__} without weight and bias")
        if weight.dim() == 2:
            weight.mul_(self.ssf_scale[:, None])
        else:
            weight.mul_(self.ssf_scale)
        bias.mul_(self.ssf_scale).add_(self.ssf_shift)
        return base


def _channels(dim: int, hidden: int, site: str) -> int:
    return {"attn.qkv": 3 * dim, "mlp.fc1": hidden}.get(site, dim)


@register
@dataclass(frozen=True)
class SSF(MethodSpec):
    """Scaling and shifting features (Lian et al.): γ = 1, β = 0 at start; `init: normal` draws N(1, .02), N(0, .02)."""

    name = "ssf"
    category = "partial"
    mergeable = True
    order = 20

    init: str = "identity"

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        return self.init == "identity"

    def __post_init__(self):
        require(self.init in ("identity", "normal"), self.name, f"init must be identity or normal, got {self.init!r}")

    def count(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        return sum(2 * _channels(spec.dims[i], spec.mlp_hidden[i], s) for i in blocks for s in SSF_SITES)

    def apply(self, model: nn.Module, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        for i in blocks:
            for site in SSF_SITES:
                channels = _channels(spec.dims[i], spec.mlp_hidden[i], site)
                wrap(model, f"{block_path(model, i)}.{site}", lambda m, c=channels: ScaleShift(m, c, self.init))
