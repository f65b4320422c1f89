"""timm's Eva family (EVA-02, DINOv3, PE, the rope ViTs): small random-initialised variants (depth 2, width 64,
56-64 px) of each attention and MLP layout through the invariant checks of tests/test_methods.py, and the rotary
embedding's place for the prompt and prefix methods."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from test_backbones_families import ADDITIONS, METHOD_CASES, NUM_CLASSES, check_outside_layerscale, inputs, small
from test_methods import check_invariants

from autopeft.backbones import backbone_spec, create_backbone
from autopeft.errors import AutopeftError, UnsupportedBackbone
from autopeft.eva import rope_embed
from autopeft.features import prefix_forward, suffix_forward, supports_cache
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
    # timm's AttentionRope with a per-block (mixed) rope; average pooling (class-token pooling is eva02_split's: here
    # the 3 training steps at lr 1e-2 turn off AdaptFormer's 4 ReLU units on the class token of the last block,
    # which then reads as a dead branch)
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", 64, dict(SMALL, global_pool="avg")),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
@pytest.mark.parametrize("layout", sorted(EVA))
def test_every_method_on_every_eva_layout(layout: str, method: str, tmp_path) -> None:
    make, spec = small(layout, EVA)
    assert spec.family == "eva"
    plan = PeftPlan.single(make_spec(method, METHOD_CASES[method]), range(spec.num_blocks))
    check_invariants(make, spec, plan, *inputs(spec), tmp_path)


@pytest.mark.parametrize("method", ["lora", "vpt_deep", "prefix", "adaptformer"])
@pytest.mark.parametrize("layout", sorted(EVA))
def test_cached_prefix_then_suffix_is_the_model(layout: str, method: str) -> None:
    """Block 0 frozen: its output, cached, then the adapted last block with the rope the model builds."""
    make, spec = small(layout, EVA)
    plan = PeftPlan.single(make_spec(method, METHOD_CASES[method]), [1])
    model = plan.apply(make(), spec)
    assert supports_cache(model) and plan.frozen_prefix(spec) == 1
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "head" not in n:
                p.normal_(std=0.1)  # past initialisation: the method changes the output
        x, _ = inputs(spec)
        torch.testing.assert_close(suffix_forward(model, prefix_forward(model, x, 1), 1), model(x), atol=1e-5,
                                   rtol=1e-5)


# -- the rotary embedding: prompts and prefixes sit at no position ----------------------------------------------------

ROPE = ["eva02", "dinov3", "rope_mixed"]  # EVA-02's, DINOv3's and the per-block (mixed) rope


def _as_prefix_tokens(model: torch.nn.Module, extra: int) -> torch.nn.Module:
    """`model` (VPT applied) computed the other way round: the prompts counted as the attention's prefix tokens,
    which timm's Eva attention leaves unrotated, and the rope passed on as the model builds it."""
    other = copy.deepcopy(model)
    for m in other.modules():
        if isinstance(m, PromptedBlock):
            m.prompts_inside = lambda: 0  # type: ignore[method-assign]  # no identity rows: timm skips the prompts
        if hasattr(m, "num_prefix_tokens") and hasattr(m, "qkv"):
            m.num_prefix_tokens += extra
    return other


@pytest.mark.parametrize("method", ["vpt_deep", "vpt_shallow"])
@pytest.mark.parametrize("layout", ROPE)
def test_prompts_get_no_rotary_embedding(layout: str, method: str) -> None:
    make, spec = small(layout, EVA)
    model = PeftPlan.single(make_spec(method, {"length": 3}), range(spec.num_blocks)).apply(make(), spec)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "prompts" in n:
                p.normal_()  # prompts far from the patch tokens: a rotation would show
    x, _ = inputs(spec)
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(ours, _as_prefix_tokens(model, 3)(x), atol=1e-5, rtol=1e-5)
        # and rotating the prompts as patch tokens would be another function (the check can tell them apart)
        shifted = copy.deepcopy(model)
        for m in shifted.modules():
            if isinstance(m, PromptedBlock):
                m.prompts_inside = lambda: 0  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):  # timm's rope covers the patch tokens only: the counts differ
            shifted(x)


@pytest.mark.parametrize("layout", ROPE + ["eva02_split"])
def test_prefix_keys_get_no_rotary_embedding(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefix attention equals timm's own attention (rope on its queries and keys) whose keys and values get the
    prefixes in front just before the product: unrotated."""
    make, spec = small(layout, EVA)
    model = PeftPlan.single(make_spec("prefix", {"length": 3}), [0]).apply(make(), spec)
    attn: Any = model.blocks[0].attn
    base: Any = attn.base
    base.fused_attn = True  # timm's product through F.scaled_dot_product_attention, where the prefixes join
    rope = rope_embed(model)
    rope = rope[0] if getattr(model, "rope_mixed", False) else rope
    tokens = spec.num_patches + spec.num_prefix_tokens
    x = torch.randn(2, tokens, spec.dims[0], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = attn(x, rope=rope)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def with_prefixes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            pk, pv = (p.reshape(1, 3, k.shape[1], -1).transpose(1, 2).expand(k.shape[0], -1, -1, -1)
                      for p in (attn.prefix_k, attn.prefix_v))
            return sdpa(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", with_prefixes)
        reference = base(x, rope=rope)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


# -- LayerScale as block parameters (DINOv3, the rope ViTs) ----------------------------------------------------------


@pytest.mark.parametrize("method", sorted(ADDITIONS))
def test_additions_join_the_residual_outside_evas_gamma(method: str) -> None:
    name, size, kwargs = EVA["dinov3"]
    layout = {"dinov3_ls": (name, size, dict(kwargs, init_values=1e-2))}
    make, spec = small("dinov3_ls", layout)
    assert all(float(b.gamma_1.detach().abs().max()) == pytest.approx(1e-2) for b in make().blocks)
    check_outside_layerscale(make, spec, method)
    plan = PeftPlan.single(make_spec(method, ADDITIONS[method]), range(spec.num_blocks))
    assert "blocks.0.gamma_1" in plan.apply(make(), spec).state_dict()  # the block's own names stay


# -- what is refused, and why ----------------------------------------------------------------------------------------


def test_fact_refuses_evas_swiglu_width_that_its_pieces_do_not_tile() -> None:
    spec = backbone_spec("eva02_tiny_patch14_224", 56)  # SwiGLU of 8/3 the block width, packed: 2 x 512 on 192
    assert spec.fc1_widths(0) == (1024,) and spec.mlp_hidden[0] == 512
    with pytest.raises(UnsupportedBackbone, match="fc1/fc2 need MLP widths divisible by the block width"):
        PeftPlan.single(make_spec("fact_tt"), range(spec.num_blocks)).count(spec)
    attention = PeftPlan.single(make_spec("fact_tt", {"rank": 2, "targets": "q,k,v,proj"}), [0])
    assert attention.count(spec) == 2 * 2 * 192 + 4 * 2 * 2


def test_split_swiglu_counts_both_input_projections() -> None:
    spec = backbone_spec("eva02_base_patch14_224", 56)  # fc1_g and fc1_x, 2048 each on 768
    assert spec.fc1_widths(0) == (2048, 2048) and spec.mlp_hidden[0] == 2048
    assert PeftPlan.single(make_spec("lora", {"rank": 1, "targets": "fc1"}), [0]).count(spec) == 2 * (768 + 2048)
    assert PeftPlan.single(make_spec("ssf"), [1]).count(spec) == 2 * (3 * 768 + 768 + 2 * 2048 + 768 + 2 * 768)


def test_eva_attention_narrower_than_the_block_is_refused_naming_its_class() -> None:
    with pytest.raises(AutopeftError, match="timm's AttentionRope in block 0 of this Eva model"):
        create_backbone("vit_small_patch16_rope_224", num_classes=NUM_CLASSES, depth=1, num_kv_heads=2,
                        qkv_fused=False)


def test_post_norm_eva_blocks_are_refused_naming_their_class() -> None:
    with pytest.raises(AutopeftError, match="timm's EvaBlockPostNorm blocks .* are not supported"):
        backbone_spec("eva02_enormous_patch14_clip_224")


def test_families_list_eva_examples_that_timm_knows() -> None:
    import timm

    from autopeft.families import FAMILIES, REFUSED

    eva = [f for f in FAMILIES if f.timm_class == "Eva"]
    assert eva and "Eva" not in REFUSED
    names = [n for f in eva for n in f.examples]
    assert any("eva02" in n for n in names) and any("dinov3" in n for n in names)
    for n in names:
        assert timm.is_model(n), n
    for f in eva:
        assert backbone_spec(f.examples[-1]).family == "eva"


@pytest.mark.parametrize("name", ["eva02_base_patch14_224", "eva02_small_patch14_224", "vit_small_plus_patch16_dinov3"])
def test_counts_at_full_size(name: str) -> None:
    """The closed-form counts of the size-shaping methods against the full architecture, built on the meta device:
    separate q/k/v and SwiGLU's fc1_g/fc1_x with its inner norm (EVA-02 base), packed SwiGLU (small), DINOv3's."""
    spec = backbone_spec(name)
    blocks = range(spec.num_blocks)
    plans = [PeftPlan.single(make_spec(m, o), blocks) for m, o in [
        ("lora", {"rank": 2, "targets": "q,k,v,proj,fc1,fc2"}), ("ssf", {}), ("bitfit", {}), ("ln_tune", {}),
        ("fact_tt", {"rank": 2, "targets": "q,k,v,proj"}), ("prefix", {"length": 2}), ("vpt_deep", {"length": 2})]]
    for plan in plans:
        with torch.device("meta"):
            model = plan.apply(create_backbone(name, num_classes=NUM_CLASSES), spec)
        trained = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head"))
        assert plan.count(spec) == trained, plan


def test_one_shot_supernet_slices_on_eva(monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/test_supernet.py's slice checks on the registered tiny Eva (rope, q/v biases, SwiGLU, LayerScale)."""
    import test_supernet

    monkeypatch.setattr(test_supernet, "VIT", "autopeft_test_eva")
    for method in test_supernet.SLICEABLE:
        test_supernet.test_a_slice_computes_the_plan_built_alone(method)
    test_supernet.test_mixed_slices_compute_their_plans_and_switching_all_off_is_the_backbone()
