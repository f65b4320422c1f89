"""Published ViT-B/16 parameter counts: each method at its paper's settings counts what the paper prints.

Counts come from the architecture alone (timm on the meta device, no weights). Papers print millions with two
decimals; SSF's tables add the classifier head averaged over the benchmark's tasks, so the test does the same.
"""

from __future__ import annotations

import math

import pytest
import torch

from autopeft.backbones import backbone_spec
from autopeft.methods import make_spec
from autopeft.plan import PeftPlan

VIT_B = "vit_base_patch16_224"
# VTAB-1k's 19 tasks and FGVC's 5 data sets, by class count (REFERENCE.md; CUB, NABirds, Flowers, Dogs, Cars).
VTAB_CLASSES = (100, 102, 47, 102, 37, 10, 397, 2, 10, 45, 5, 8, 6, 6, 4, 16, 16, 18, 9)
FGVC_CLASSES = (200, 555, 102, 120, 196)


def _count(method: str, options: dict | None = None) -> int:
    spec = backbone_spec(VIT_B)
    return PeftPlan.single(make_spec(method, options or {}), range(spec.num_blocks)).count(spec)


def _mean_head(classes: tuple[int, ...]) -> float:
    spec = backbone_spec(VIT_B)
    return sum(spec.head_params(c) for c in classes) / len(classes)


def test_ssf_count_is_the_official_one() -> None:
    # 12 blocks × 2 × (3d + d + 4d + d + d + d) + 2d after the patch embedding + 2d after the final norm, d = 768
    assert _count("ssf") == 12 * 2 * 11 * 768 + 2 * 768 + 2 * 768 == 205_824


@pytest.mark.parametrize("classes,published", [(VTAB_CLASSES, 0.24), (FGVC_CLASSES, 0.39)])
def test_ssf_matches_the_paper_tables(classes: tuple[int, ...], published: float) -> None:
    # SSF paper, Tables 1 (FGVC mean) and 2 (VTAB-1k mean): 0.39 M and 0.24 M, head included
    assert round((_count("ssf") + _mean_head(classes)) / 1e6, 2) == published


def test_ssf_ends_are_needed_for_the_fgvc_figure() -> None:
    # without the patch-embedding and final-norm sites (202,752, the count before) FGVC would read 0.38 M
    spec = backbone_spec(VIT_B)
    inner = PeftPlan.single(make_spec("ssf"), range(1, spec.num_blocks - 1)).count(spec)
    assert _count("ssf") - inner == 2 * 22 * 768 + 2 * 768 + 2 * 768
    assert round((_count("ssf") - 4 * 768 + _mean_head(FGVC_CLASSES)) / 1e6, 2) == 0.38


@pytest.mark.parametrize("method,options,published", [
    ("lora", {"rank": 8, "targets": "q,v"}, 0.29),  # NOAH Table (VTAB-1k): LoRA 0.29 M
    ("adapter", {"dim": 8}, 0.16),  # NOAH Table (VTAB-1k): Adapter 0.16 M
    ("adaptformer", {"dim": 8}, 0.16),  # NOAH Table (VTAB-1k): AdaptFormer 0.16 M
    ("convpass", {"dim": 8}, 0.33),  # Convpass Table (VTAB-1k): 0.33 M
    ("bitfit", {}, 0.10),  # NOAH Table (VTAB-1k): BitFit 0.10 M
])
def test_published_counts(method: str, options: dict, published: float) -> None:
    assert round(_count(method, options) / 1e6, 2) == published


def test_fact_tt_count_is_the_official_one() -> None:
    # FacT's official TT code: U and V (2 · 768 · r) plus, per block, r×r cores for q, k, v, proj and r×4r for fc1
    # and fc2 (12 r² per block)
    r = 8
    assert _count("fact_tt", {"rank": r}) == 2 * 768 * r + 12 * 12 * r * r == 21_504


# PETL_Vision (OSU-MLB, CVPR 2025) re-implements every method on ViT-B/16 and prints `inserted_parameters` (head
# excluded) in tune_output/default_vtab/processed_vtab/dtd/<method>/final_result.json, with the chosen size.
PETL_VISION = [
    ("ssf", {}, 205_824),
    ("ln_tune", {}, 38_400),
    ("fact_tt", {"rank": 32}, 196_608),
    ("convpass", {"dim": 8}, 327_552),
    ("adaptformer", {"dim": 32}, 599_424),
    ("adapter", {"dim": 8, "position": "both"}, 313_536),  # rand_h_adapter: Houlsby, after attention and MLP
    ("lora", {"rank": 1, "targets": "q,v"}, 36_864),
    ("vpt_deep", {"length": 100}, 921_600),
    ("vpt_shallow", {"length": 200}, 153_600),
]


@pytest.mark.parametrize("method,options,printed", PETL_VISION, ids=[m for m, _, _ in PETL_VISION])
def test_counts_match_petl_vision(method: str, options: dict, printed: int) -> None:
    assert _count(method, options) == printed


def test_bitfit_leaves_out_the_embedding_and_final_norm_biases() -> None:
    # PETL_Vision's bitfit prints 102,912: ours (block biases) plus patch_embed.proj.bias and norm.bias (2 × 768),
    # which lie outside the blocks a per-block method is placed on
    assert _count("bitfit") == 102_912 - 2 * 768


# ---------------------------------------------------------------------------------------------------------------
# Initialisation as the official code has it (tiny backbone, no weights needed)

TINY = "autopeft_test_vit"  # 32 px, patch 8, width 32


def _applied(method: str, options: dict | None = None) -> torch.nn.Module:
    from autopeft.backbones import create_backbone

    spec = backbone_spec(TINY)
    plan = PeftPlan.single(make_spec(method, options or {}), range(spec.num_blocks))
    return plan.apply(create_backbone(TINY, num_classes=3), spec)


@pytest.mark.parametrize("method", ["vpt_shallow", "vpt_deep"])
def test_vpt_prompts_start_uniform_at_the_patch_scale(method: str) -> None:
    torch.manual_seed(0)
    model = _applied(method, {"length": 50})
    prompts = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith("prompts")])
    bound = math.sqrt(6.0 / (3 * 8 * 8 + 32))  # VPT: ±sqrt(6 / (3 · patch² + d))
    assert prompts.abs().max() <= bound and prompts.abs().max() > 0.95 * bound


def test_ssf_default_init_is_the_official_normal() -> None:
    torch.manual_seed(0)
    model = _applied("ssf")
    scales = torch.cat([p.detach() for n, p in model.named_parameters() if n.endswith("ssf_scale")])
    shifts = torch.cat([p.detach() for n, p in model.named_parameters() if n.endswith("ssf_shift")])
    assert abs(scales.mean().item() - 1) < 0.005 and 0.015 < scales.std().item() < 0.025
    assert abs(shifts.mean().item()) < 0.005 and 0.015 < shifts.std().item() < 0.025
    identity = _applied("ssf", {"init": "identity"})
    assert all(torch.all(p == (1 if n.endswith("scale") else 0)) for n, p in identity.named_parameters()
               if "ssf_" in n)


def test_fact_tt_cores_start_as_linear_layers() -> None:
    torch.manual_seed(0)
    model = _applied("fact_tt", {"rank": 4})
    fc1, fc2 = model.blocks[0].mlp.fc1.fact_cores.detach(), model.blocks[0].mlp.fc2.fact_cores.detach()
    # MLP width 2d here: fc1 is r → 2r (fan-in r), fc2 2r → r (fan-in 2r), as nn.Linear initialises them
    assert fc1.abs().max() <= 1 / math.sqrt(4) and fc1.abs().max() > 0.8 / math.sqrt(4)
    assert fc2.abs().max() <= 1 / math.sqrt(8) and fc2.abs().max() > 0.8 / math.sqrt(8)


def test_convpass_uses_quick_gelu() -> None:
    from autopeft.methods.convpass import quick_gelu

    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(quick_gelu(x), x * torch.sigmoid(1.702 * x))
    assert not torch.allclose(quick_gelu(x), torch.nn.functional.gelu(x), atol=1e-3)


@pytest.mark.parametrize("source", ["norm", "residual"])
def test_adaptformer_input(source: str) -> None:
    # residual: the official code's adapter reads x (after attention), not LN(x); norm: the paper's LN(x)
    torch.manual_seed(0)
    model = _applied("adaptformer", {"dim": 4, "scale": 0.5, "input": source}).eval()
    block = model.blocks[0]
    torch.nn.init.normal_(block.mlp.adapter.up.weight)
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        mid = x + block.attn(block.norm1(x))
        norm2 = block.norm2.base if source == "residual" else block.norm2
        h = norm2(mid)
        expected = mid + block.mlp.base(h) + 0.5 * block.mlp.adapter(mid if source == "residual" else h)
        torch.testing.assert_close(block(x), expected)
