"""Prompt tokens around a ViT block: insert learned tokens after the prefix (class/register) tokens, strip later."""

from __future__ import annotations

import torch
from torch import nn

from autopeft.methods.base import Wrapper


class PromptedBlock(Wrapper):
    """Inserts `prompts` (if any) at position `offset` before the block and removes `strip` tokens there after it.

    VPT-deep: prompts and strip of the same length on each block (new prompts replace the previous ones).
    VPT-shallow: prompts on the first block, strip on the last, so they travel through every block.
    """

    method = "vpt"

    def __init__(self, base: nn.Module, offset: int, prompts: nn.Parameter | None = None, strip: int = 0):
        super().__init__(base)
        self.offset = offset
        self.prompts = prompts
        self.strip = strip

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.prompts is not None:
            p = self.prompts.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat([x[:, : self.offset], p, x[:, self.offset :]], dim=1)
        x = self.base(x, *args, **kwargs)
        if self.strip:
            x = torch.cat([x[:, : self.offset], x[:, self.offset + self.strip :]], dim=1)
        return x


def new_prompts(length: int, dim: int, like: torch.Tensor) -> nn.Parameter:
    p = torch.empty(length, dim, device=like.device, dtype=like.dtype)
    nn.init.trunc_normal_(p, std=0.02)
    return nn.Parameter(p)
