"""timm's Eva family (EVA-02, DINOv3, PE, the rope ViTs): small random-initialised variants (depth 2, width 64,
56-64 px) of each attention and MLP layout through the invariant checks of tests/test_methods.py, and the rotary
embedding's place for the prompt and prefix methods."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from test_backbones_families import METHOD_CASES, inputs, small
from test_methods import check_invariants

from autopeft.backbones import backbone_spec
from autopeft.errors import AutopeftError, UnsupportedBackbone
from autopeft.features import prefix_forward, suffix_forward
from autopeft.methods import make_spec
from autopeft.methods._prompts import PromptedBlock
from autopeft.plan import PeftPlan

SMALL = dict(depth=2, embed_dim=64, num_heads=2, mlp_ratio=2.0)  # MLP widths that FacT's d × d pieces tile
EVA = {  # layout -> (timm name, input size, creation keywords)
    # fused qkv with separate q/v biases (no k bias), packed SwiGLU (GluMlp), rope after the class token
    "eva02": ("eva02_tiny_patch14_224", 56, SMALL),
    # separate q/k/v projections, SwiGLU with fc1_g/fc1_x and an inner norm, a norm inside the attention
    "eva02_split": ("eva02_base_patch16_clip_224", 64, SMALL),
    # LayerScale as block parameters, 4 register tokens, DINOv3's rope, qkv without bias
    "dinov3": ("vit_small_patch16_dinov3", 64, SMALL),
    # timm's AttentionRope with a per-block (mixed) rope
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", 64, SMALL),
}
# FacT's d × d pieces do not tile EVA-02's SwiGLU width (8/3 of the block width) at its own MLP ratio
EVA02_OWN = {"eva02_own": ("eva02_tiny_patch14_224", 56, dict(depth=2, embed_dim=64, num_heads=2))}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
@pytest.mark.parametrize("layout", sorted(EVA))
def test_every_method_on_every_eva_layout(layout: str, method: str, tmp_path) -> None:
    make, spec = small(layout, EVA)
    assert spec.family == "eva"
    plan = PeftPlan.single(make_spec(method, METHOD_CASES[method]), range(spec.num_blocks))
    check_invariants(make, spec, plan, *inputs(spec), tmp_path)
