"""Inference overhead of a plan: the FLOPs its unmerged parts add, relative to the plain backbone (closed form).

A plan of mergeable methods costs nothing once merged (overhead 0). Addition methods report what they add through
`MethodSpec.overhead_flops`; this module supplies the denominator: the backbone's own FLOPs per image.
"""

from __future__ import annotations

from autopeft.backbones import BackboneSpec
from autopeft.plan import PeftPlan

# Swin attends within windows of 7 x 7 tokens (timm's default for every swin_* model).
_SWIN_WINDOW_TOKENS = 49


def block_tokens(spec: BackboneSpec, i: int) -> int:
    """Tokens entering block `i`: a ViT keeps its patches plus class/register tokens; each Swin stage halves the
    grid side as it doubles the width."""
    return spec.num_patches * spec.dims[0] ** 2 // spec.dims[i] ** 2 + spec.num_prefix_tokens


def backbone_flops(spec: BackboneSpec) -> int:
    """FLOPs (2 × multiply-adds) of the backbone's blocks for one image; embedding and head are left out."""
    total = 0
    for i in range(spec.num_blocks):
        d, h, n = spec.dims[i], spec.mlp_hidden[i], block_tokens(spec, i)
        fc1 = sum(spec.fc1_widths(i))  # a gated MLP's input projection(s) are twice fc2's input width
        keys = min(n, _SWIN_WINDOW_TOKENS) if spec.family == "swin" else n  # ViT and Eva attend globally
        total += 2 * n * (4 * d * d + d * fc1 + h * d) + 4 * n * keys * d
    return total


def plan_overhead_flops(plan: PeftPlan, spec: BackboneSpec) -> int:
    """FLOPs per image the plan adds at inference after merging what merges."""
    return sum(0 if s.mergeable else s.overhead_flops(spec, blocks) for s, blocks in plan.groups())


def plan_overhead(plan: PeftPlan, spec: BackboneSpec) -> float:
    """Added inference FLOPs as a fraction of the plain backbone's (0.0 for a plan that merges completely)."""
    return plan_overhead_flops(plan, spec) / backbone_flops(spec)
