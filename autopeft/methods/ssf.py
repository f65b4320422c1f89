"""SSF: per-channel scale and shift after qkv, proj, fc1, fc2 and both norms of each block, after the patch
embedding (with block 0) and after the final norm (with the last block), as in the official code (Lian et al.)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autopeft.backbones import BackboneSpec, block_path, final_norm_modules
from autopeft.errors import AutopeftError
from autopeft.eva import qkv_as_module
from autopeft.methods.base import MethodSpec, Sliceable, Wrapper, merged_base, register, require, unwrap, wrap

SSF_SITES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2")
INITS = ("normal", "identity")


class ScaleShift(Wrapper, Sliceable):
    """y = base(x) · γ + β per channel: the last dimension, or dimension 1 of a convolution's (B, C, H, W) output."""

    method = "ssf"

    def __init__(self, base: nn.Module, channels: int, init: str, fold_into: nn.Parameter | None = None,
                 grid: int = 0):
        """`fold_into`: for a patch embedding without a bias, the position embedding its shift folds into on merge
        (its last `grid` rows are the patch tokens')."""
        super().__init__(base)
        self._fold = [fold_into] if fold_into is not None else []  # a list: the model owns the parameter
        ref = next(unwrap(base).parameters())
        self.ssf_scale = nn.Parameter(torch.ones(channels, device=ref.device, dtype=ref.dtype))
        self.ssf_shift = nn.Parameter(torch.zeros(channels, device=ref.device, dtype=ref.dtype))
        # a conv's channels are dimension 1 of its output, a Linear's or a norm's the last one
        self.channel_dims = 3 if isinstance(unwrap(base), nn.Conv2d) else 1
        if init == "normal":
            nn.init.normal_(self.ssf_scale, mean=1.0, std=0.02)
            nn.init.normal_(self.ssf_shift, std=0.02)
        self.on, self.grid = True, grid

    def set_active(self, spec: MethodSpec | None) -> None:
        self.on = spec is not None  # SSF has no size: a slice is on or off

    def sliced_state(self) -> dict[str, torch.Tensor]:
        return {"ssf_scale": self.ssf_scale, "ssf_shift": self.ssf_shift} if self.on else {}

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.on:
            return self.base(*args, **kwargs)
        shape = (-1,) + (1,) * (self.channel_dims - 1)
        return self.base(*args, **kwargs) * self.ssf_scale.view(shape) + self.ssf_shift.view(shape)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        base = merged_base(self)
        weight, bias = getattr(base, "weight", None), getattr(base, "bias", None)
        if weight is None or (bias is None and not self._fold):
            raise AutopeftError(f"ssf cannot merge into {type(base).__name__} without weight and bias")
        # output channels are the first dimension of a Linear's or a conv's weight, the only one of a norm's
        weight.mul_(self.ssf_scale.view((-1,) + (1,) * (weight.dim() - 1)))
        if bias is not None:
            bias.mul_(self.ssf_scale).add_(self.ssf_shift)
        else:  # the patch tokens get the position embedding added right after: the shift joins it exactly
            pos = self._fold[0]
            pos[:, pos.shape[1] - self.grid :].add_(self.ssf_shift.to(pos.dtype))
        return base


def _channels(spec: BackboneSpec, i: int, site: str) -> int:
    return {"attn.qkv": 3 * spec.dims[i], "mlp.fc1": sum(spec.fc1_widths(i))}.get(site, spec.dims[i])


# The modules a site is, where a family splits it: Eva's separate q, k, v projections, SwiGLU's two input projections.
_SPLIT = {"attn.qkv": ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "mlp.fc1": ("mlp.fc1_g", "mlp.fc1_x")}


def _site_paths(block: nn.Module, site: str) -> list[str]:
    """The module paths inside `block` that SSF scales for `site` (several where the family splits it)."""
    parent, _, child = site.partition(".")
    if site in _SPLIT and getattr(block.get_submodule(parent), child, None) is None:
        return list(_SPLIT[site])
    return [site]


@register
@dataclass(frozen=True)
class SSF(MethodSpec):
    """Scaling and shifting features (Lian et al., NeurIPS 2022).

    Official placement: after qkv, proj, fc1, fc2, norm1 and norm2 of every block, after the patch embedding and
    after the final norm. Here the patch embedding is scaled when block 0 is among the blocks and the final norm when
    the last block is, so SSF on every block is the official method. `init: normal` (default, the official code)
    draws γ ~ N(1, 0.02), β ~ N(0, 0.02); `init: identity` starts at γ = 1, β = 0 (the pretrained model's outputs).
    """

    name = "ssf"
    lr_range = (3e-4, 3e-3)
    category = "partial"
    mergeable = True
    order = 20
    sliceable = True

    init: str = "normal"

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        return self.init == "identity"

    def __post_init__(self) -> None:
        require(self.init in INITS, self.name, f"init must be {' or '.join(INITS)}, got {self.init!r}")

    def _ends(self, spec: BackboneSpec, blocks: Sequence[int]) -> tuple[bool, bool]:
        """(scale the patch embedding, scale the final norm)."""
        return 0 in blocks, spec.num_blocks - 1 in blocks and spec.final_norm_params > 0

    def count(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        total = sum(2 * _channels(spec, i, s) for i in blocks for s in SSF_SITES)
        embed, final = self._ends(spec, blocks)
        return total + embed * 2 * spec.dims[0] + final * 2 * spec.dims[-1]

    def first_block(self, spec: BackboneSpec, blocks: Sequence[int]) -> int:
        return -1 if 0 in blocks else super().first_block(spec, blocks)

    def merge_blocker(self, spec: BackboneSpec, blocks: Sequence[int]) -> str | None:
        """A shift folds into a bias; a site without one (a bias-free qkv, an RMSNorm) keeps SSF at inference. The
        patch embedding's shift folds into the position embedding where it has no bias of its own."""
        where = [f"block {i}'s {p}" for i in blocks if i < len(spec.no_bias) for s in SSF_SITES
                 for p in (s, *_SPLIT.get(s, ())) if p in spec.no_bias[i]]
        embed, final = self._ends(spec, blocks)
        if embed and not spec.embed_bias and not spec.pos_embed:
            where.append("the patch embedding (and no position embedding to fold into)")
        if final and not spec.final_norm_bias:
            where.append("the final norm")
        if not where:
            return None
        more = f" and {len(where) - 2} more" if len(where) > 2 else ""
        return f"ssf does not merge on {spec.name}: {', '.join(where[:2])}{more} ha(s) no bias to absorb its shift"

    def apply(self, model: nn.Module, spec: BackboneSpec, blocks: Sequence[int]) -> None:
        for i in blocks:
            block = block_path(model, i)
            for site in SSF_SITES:
                if site == "attn.qkv":
                    qkv_as_module(model.get_submodule(f"{block}.attn"))  # Eva's q/v biases are added after the scale
                for path in _site_paths(model.get_submodule(block), site):
                    module: Any = unwrap(model.get_submodule(f"{block}.{path}"))
                    channels = module.out_features if isinstance(module, nn.Linear) else spec.dims[i]
                    wrap(model, f"{block}.{path}", lambda m, c=channels: ScaleShift(m, c, self.init))
        embed, final = self._ends(spec, blocks)
        if embed:
            pos = getattr(model, "pos_embed", None) if not spec.embed_bias else None
            wrap(model, "patch_embed.proj", lambda m: ScaleShift(m, spec.dims[0], self.init, pos, spec.num_patches))
        if final:
            # ViTs have one final norm: `norm` before pooling, or `fc_norm` after it (average pooling)
            path = next(n for n, m in model.named_modules() if m is final_norm_modules(model)[-1])
            wrap(model, path, lambda m: ScaleShift(m, spec.dims[-1], self.init))
