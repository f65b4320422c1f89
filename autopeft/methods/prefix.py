"""Prefix tuning: `length` learned key and value vectors prepended inside each chosen block's attention."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autopeft.backbones import BackboneSpec, block_path
from autopeft.errors import AutopeftError
from autopeft.methods.base import MethodSpec, Sliceable, Wrapper, fits, register, require, wrap


class PrefixAttention(Wrapper, Sliceable):
    """timm ViT attention computed from the base module's own layers, with learned key/value prefixes.

    The base module's qkv, q_norm/k_norm, norm and proj are called as modules, so LoRA or SSF wrapped around them
    keep working; only the attention product is recomputed here to make room for the extra keys and values.
    """

    method = "prefix"

    def __init__(self, base: nn.Module, length: int, dim: int):
        super().__init__(base)
        ref = next(base.parameters())
        self.prefix_k = nn.Parameter(torch.empty(length, dim, device=ref.device, dtype=ref.dtype))
        self.prefix_v = nn.Parameter(torch.empty(length, dim, device=ref.device, dtype=ref.dtype))
        nn.init.trunc_normal_(self.prefix_k, std=0.02)
        nn.init.trunc_normal_(self.prefix_v, std=0.02)
        self.length = self.n = length  # n: the prefixes a slice runs (`set_active`; 0: none)

    def set_active(self, spec: MethodSpec | None) -> None:
        prefix: Any = spec
        self.n = 0 if spec is None else fits(self.method, self.length, prefix.length)

    def sliced_state(self) -> dict[str, torch.Tensor]:
        return {"prefix_k": self.prefix_k[: self.n], "prefix_v": self.prefix_v[: self.n]} if self.n else {}

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise AutopeftError("prefix tuning does not support attention masks")
        if not self.n:
            return self.base(x)
        a: Any = self.base  # timm's Attention: its submodules and head sizes are read dynamically
        b, n, _ = x.shape
        heads, head_dim = a.num_heads, a.head_dim
        gate = a.gate(x).sigmoid() if getattr(a, "gate", None) is not None else None
        q, k, v = a.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        length = self.n
        pk = self.prefix_k[:length].reshape(1, length, heads, head_dim).transpose(1, 2).expand(b, -1, -1, -1)
        pv = self.prefix_v[:length].reshape(1, length, heads, head_dim).transpose(1, 2).expand(b, -1, -1, -1)
        k = torch.cat([pk.to(k.dtype), k], dim=2)
        v = torch.cat([pv.to(v.dtype), v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if self.training else 0.0)
        out = a.norm(out.transpose(1, 2).reshape(b, n, heads * head_dim))
        if gate is not None:
            out = out * gate
        return a.proj_drop(a.proj(out))


@register
@dataclass(frozen=True)
class Prefix(MethodSpec):
    """Prefix tuning (Li & Liang) as used for ViTs: per-block learned key/value prefixes, small random start."""

    name = "prefix"
    lr_range = (1e-3, 1e-2)
    category = "addition"
    families = ("vit",)
    order = 30  # innermost around attention: adapters and bypasses wrap it
    size_option = "length"
    sliceable = True

    length: int = 10

    def __post_init__(self) -> None:
        require(self.length >= 1, self.name, f"length must be a positive integer, got {self.length}")

    def count(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        return sum(2 * self.length * spec.dims[i] for i in blocks)

    def overhead_flops(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        # Every query scores `length` more keys and mixes as many more values: 2 x (n * length * dim) multiply-adds.
        n = spec.num_patches + spec.num_prefix_tokens
        return sum(4 * n * self.length * spec.dims[i] for i in blocks)

    def apply(self, model: nn.Module, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        for i in blocks:
            wrap(model, f"{block_path(model, i)}.attn", lambda m, d=spec.dims[i]: PrefixAttention(m, self.length, d))
