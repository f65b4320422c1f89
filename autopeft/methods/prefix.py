"""Prefix tuning: `length` learned key and value vectors prepended inside each chosen block's attention."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from torch import nn

from autopeft.backbones import BackboneSpec, block_path
from autopeft.errors import AutopeftError
from autopeft.methods.base import MethodSpec, Sliceable, Wrapper, fits, register, require, wrap


class PrefixAttention(Wrapper, Sliceable):
    """timm ViT (or Eva) attention computed from the base module's own layers, with learned key/value prefixes.

    The base module's qkv, q_norm/k_norm, norm and proj are called as modules, so LoRA or SSF wrapped around them
    keep working; only the attention product is recomputed here to make room for the extra keys and values. On a
    rope backbone the prefixes get no rotary embedding: they are keys at no position, as a ViT's prefixes carry no
    position embedding.
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

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise AutopeftError("prefix tuning does not support attention masks")
        if not self.n:
            return self.base(x) if rope is None else self.base(x, rope=rope)
        a: Any = self.base  # timm's Attention (or Eva's): its submodules and head sizes are read dynamically
        b, n, _ = x.shape
        heads = a.num_heads
        gate = a.gate(x).sigmoid() if getattr(a, "gate", None) is not None else None
        q, k, v = _qkv(a, x)
        q, k = a.q_norm(q), a.k_norm(k)
        if rope is not None:  # as the Eva attention rotates them: the patch tokens only, after its prefix tokens
            q, k = _rotate(a, q, rope).type_as(v), _rotate(a, k, rope).type_as(v)
        length = self.n
        # the prefixes sit at no position: they are concatenated after the rotation and get none
        pk = self.prefix_k[:length].reshape(1, length, heads, -1).transpose(1, 2).expand(b, -1, -1, -1)
        pv = self.prefix_v[:length].reshape(1, length, heads, -1).transpose(1, 2).expand(b, -1, -1, -1)
        k = torch.cat([pk.to(k.dtype), k], dim=2)
        v = torch.cat([pv.to(v.dtype), v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if self.training else 0.0)
        out = a.norm(out.transpose(1, 2).reshape(b, n, -1))
        if gate is not None:
            out = out * gate
        return a.proj_drop(a.proj(out))


def _qkv(a: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values (batch, heads, tokens, head width) as the attention computes them, its projections
    called as modules (LoRA, SSF or FacT around them run): a fused qkv, plus Eva's separate q/k/v biases where it
    has them, or Eva's three projections."""
    b, n, _ = x.shape
    if getattr(a, "qkv", None) is None:
        q, k, v = (a.get_submodule(f"{t}_proj")(x).reshape(b, n, a.num_heads, -1).transpose(1, 2) for t in "qkv")
        return q, k, v
    qkv = a.qkv(x)
    if getattr(a, "q_bias", None) is not None:
        qkv = qkv + torch.cat((a.q_bias, a.k_bias, a.v_bias))
    q, k, v = qkv.reshape(b, n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _rotate(a: Any, t: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    npt = a.num_prefix_tokens
    rotated = apply_rot_embed_cat(t[:, :, npt:], rope, half=getattr(a, "rotate_half", False))
    return torch.cat([t[:, :, :npt], rotated], dim=2)


@register
@dataclass(frozen=True)
class Prefix(MethodSpec):
    """Prefix tuning (Li & Liang) as used for ViTs: per-block learned key/value prefixes, small random start."""

    name = "prefix"
    lr_range = (1e-3, 1e-2)
    category = "addition"
    families = ("vit", "eva")
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
