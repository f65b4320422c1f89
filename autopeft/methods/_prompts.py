"""Prompt tokens around a ViT block: insert learned tokens after the prefix (class/register) tokens, strip later."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from autopeft.methods.base import MethodSpec, Sliceable, Wrapper, fits


class PromptedBlock(Wrapper, Sliceable):
    """Inserts `prompts` (if any) at position `offset` before the block and removes `strip` tokens there after it.

    VPT-deep: prompts and strip of the same length on each block (new prompts replace the previous ones).
    VPT-shallow: prompts on the first block, strip on the last, so they travel through every block.

    On a backbone with rotary position embeddings (timm's Eva: the block takes `rope`, which its attention applies
    to the tokens after its prefix tokens) the prompts get none: the rope passed on has an identity rotation for
    each prompt in the block, placed where the prompts sit. `carry`: prompts this wrapper neither inserts nor strips
    but that pass through its block (VPT-shallow's blocks between the first and the last).
    """

    method = "vpt"

    def __init__(self, base: nn.Module, offset: int, prompts: nn.Parameter | None = None, strip: int = 0,
                 carry: int = 0):
        super().__init__(base)
        self.carry = carry
        self.carries = bool(carry)
        self.offset = offset
        self.prompts = prompts
        self.strip = strip
        self.strips = bool(strip)  # whether it strips tokens: a slice strips as many as its spec's length
        self.n = 0 if prompts is None else prompts.shape[0]  # the prompts a slice inserts (`set_active`)

    def set_active(self, spec: MethodSpec | None) -> None:
        length = 0 if spec is None else int(getattr(spec, "length"))  # noqa: B009  every prompt method's size
        if self.prompts is not None:
            self.n = fits(self.method, self.prompts.shape[0], length)
        self.strip = length if self.strips else 0
        self.carry = length if self.carries else 0

    def sliced_state(self) -> dict[str, torch.Tensor]:
        return {"prompts": self.prompts[: self.n]} if self.prompts is not None and self.n else {}

    def prompts_inside(self) -> int:
        """How many of this wrapper's prompts its block computes on."""
        return self.n if self.prompts is not None else self.strip or self.carry

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.prompts is not None and self.n:
            p = self.prompts[: self.n].unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat([x[:, : self.offset], p, x[:, self.offset :]], dim=1)
        if kwargs.get("rope") is not None and self.prompts_inside():
            kwargs["rope"] = unrotated_first(kwargs["rope"], self.prompts_inside())
        x = self.base(x, *args, **kwargs)
        if self.strip:
            x = torch.cat([x[:, : self.offset], x[:, self.offset + self.strip :]], dim=1)
        return x


def unrotated_first(rope: torch.Tensor, n: int) -> torch.Tensor:
    """`rope` (timm's concatenated sin and cos along the last dimension, tokens along the one before) with `n`
    identity rotations (sin 0, cos 1) in front: the tokens there are rotated by none."""
    sin_cos = rope.new_zeros(*rope.shape[:-2], n, rope.shape[-1])
    sin_cos[..., rope.shape[-1] // 2 :] = 1.0
    return torch.cat([sin_cos, rope], dim=-2)


def new_prompts(length: int, dim: int, patch_weight: torch.Tensor) -> nn.Parameter:
    """`length` prompts of width `dim`, uniform in ±sqrt(6 / (patch fan-in + dim)) as in VPT's official code.

    The bound is Xavier's for a map from one flattened image patch (channels × patch height × width, the fan-in of
    the patch embedding `patch_weight`) to a token: prompts start at the scale of patch embeddings.
    """
    bound = math.sqrt(6.0 / float(patch_weight[0].numel() + dim))
    p = torch.empty(length, dim, device=patch_weight.device, dtype=patch_weight.dtype)
    nn.init.uniform_(p, -bound, bound)
    return nn.Parameter(p)
