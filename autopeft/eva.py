"""What autopeft needs of timm's Eva class (EVA-02, DINOv3, Perception Encoder, the rope ViTs) beyond what it
shares with the VisionTransformer: the variants it refuses, the rotary embedding its blocks receive, and its
attention's fused qkv called as a module."""

from __future__ import annotations

from typing import Any

from timm.models.eva import EvaBlock
from torch import nn

from autopeft.errors import AutopeftError


def check_eva(model: Any) -> None:
    """Refuse the Eva variants autopeft does not adapt: post-norm blocks; attention whose q, k and v are not `dim`
    wide alike (grouped-query attention, a head width other than dim / heads: the methods count and slice them as
    dim x dim matrices); patch dropout."""
    for i, block in enumerate(model.blocks):
        if not isinstance(block, EvaBlock):
            raise AutopeftError(
                f"timm's {type(block).__name__} blocks (norm after each sub-layer) are not supported: AdaptFormer "
                "reads, and the adapters add to, a pre-norm block's sub-layers; autopeft adapts Eva models built of "
                "timm's EvaBlock")
        attn = block.attn
        widths = {attn.proj.in_features, attn.proj.out_features,
                  getattr(attn, "num_kv_heads", attn.num_heads) * attn.head_dim}
        if len(widths) > 1:
            raise AutopeftError(
                f"timm's {type(attn).__name__} in block {i} of this {type(model).__name__} model has q, k or v "
                f"narrower or wider than the block (widths {sorted(widths)}: grouped-query attention or a set head "
                "width); autopeft adapts Eva models whose q, k and v are as wide as the block")
        if model.patch_drop is not None:
            raise AutopeftError(f"timm's {type(model).__name__} with patch dropout (PatchDropoutWithIndices) is not "
                                "supported: it drops tokens the prompt and cache methods place; set patch_drop_rate=0")


def uses_rope(model: nn.Module) -> bool:
    """Whether `model` rotates queries and keys by position inside its attention (timm's Eva with a `rope`)."""
    return getattr(model, "rope", None) is not None


def rope_embed(model: nn.Module) -> Any:
    """The rotary embedding an Eva model passes its blocks (per block for a mixed rope), as its forward builds it;
    None without one."""
    m: Any = model
    if m.rope is None:
        return None
    if not m.dynamic_img_size and hasattr(m.rope, "feat_shape"):
        return m.rope.get_embed()
    # built for any size (DINOv3) or without a cached grid (MRoPE): the grid of the size the model was built at
    return m.rope.get_embed(shape=list(m.patch_embed.grid_size))


def qkv_as_module(attn: nn.Module) -> None:
    """Make an attention that adds separate q/v biases to its fused qkv (Eva's `q_bias`, `v_bias`) call `qkv` as a
    module, so a wrapper around it runs: timm's EvaAttention otherwise reads `qkv.weight` and calls F.linear with
    the biases, bypassing the module. `qkv(x) + bias` computes what F.linear(x, W, bias) does."""
    a: Any = attn
    if getattr(a, "q_bias", None) is not None and hasattr(a, "qkv_bias_separate"):
        a.qkv_bias_separate = True
