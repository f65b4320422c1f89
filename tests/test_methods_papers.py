"""Published ViT-B/16 parameter counts: each method at its paper's settings counts what the paper prints.

Counts come from the architecture alone (timm on the meta device, no weights). Papers print millions with two
decimals; SSF's tables add the classifier head averaged over the benchmark's tasks, so the test does the same.
"""

from __future__ import annotations

import pytest

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
