"""The backbones people fine-tune today (DINOv2 with and without registers, DeiT-III, CLIP, SigLIP, the Eva family)
at the input size the user chooses: small random-initialised variants (depth 2, 56-64 px) through the invariant
checks of tests/test_methods.py."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_methods import check_invariants

from autopeft.backbones import BackboneSpec, backbone_spec, create_backbone, spec_of_model
from autopeft.data import data_config
from autopeft.errors import AutopeftError
from autopeft.methods import list_methods, make_spec
from autopeft.plan import PeftPlan, merge_model
from autopeft.recipe import Recipe
from autopeft.train_config import SPACE_TRAINING_KEYS, TrainConfig, check_training

DINOV2_REG = "vit_small_patch14_reg4_dinov2"
# the CLI runs this checkout's autopeft from any working directory
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
    [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


# -- part 1: the input size ------------------------------------------------------------------------------------------


def test_spec_counts_the_model_at_its_input_size() -> None:
    pretrained = backbone_spec(DINOV2_REG)
    at224 = backbone_spec(DINOV2_REG, 224)
    assert pretrained.input_size == (3, 518, 518) and at224.input_size == (3, 224, 224)
    assert at224.grid == (16, 16) and at224.num_prefix_tokens == 5
    with torch.device("meta"):
        model = create_backbone(DINOV2_REG, num_classes=0, img_size=224)
    assert at224.backbone_params == sum(p.numel() for p in model.parameters()) < pretrained.backbone_params
    assert tuple(model.patch_embed.img_size) == (224, 224)


def test_a_size_the_architecture_cannot_take_is_one_line() -> None:
    with pytest.raises(AutopeftError, match="cannot run at --img-size 50.*divisible"):
        backbone_spec("vit_small_patch16_dinov3", 50)
    with pytest.raises(AutopeftError, match="positive integer"):
        backbone_spec(DINOV2_REG, 0)


def test_data_follow_the_input_size() -> None:
    cfg = data_config(DINOV2_REG, 224)
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["mean"] == data_config(DINOV2_REG)["mean"]


def test_recipes_and_trainconfig_carry_the_input_size() -> None:
    assert check_training({"img_size": 224}) == {"img_size": 224}
    assert "img_size" not in SPACE_TRAINING_KEYS  # the study's size, not a trial's choice
    with pytest.raises(AutopeftError, match="img_size must be a positive integer"):
        TrainConfig(img_size=-3)
    with pytest.raises(AutopeftError, match="must be int"):
        check_training({"img_size": 22.5})
    recipe = Recipe.from_dict(dict(version=1, backbone=DINOV2_REG, dataset="digits", epochs=1,
                                   plan={"blocks": {"0": [{"method": "bitfit"}]}}, training={"img_size": 224}))
    assert recipe.img_size == 224 and recipe.train_config().img_size == 224
    spec = backbone_spec(DINOV2_REG, 224)
    assert recipe.check() == spec.bias_params[0]
    assert Recipe.from_dict(recipe.to_dict()).img_size == 224


def test_train_builds_the_model_at_the_input_size() -> None:
    from autopeft.data import load_dataset
    from autopeft.methods import make_spec
    from autopeft.plan import PeftPlan
    from autopeft.train import train

    data = load_dataset("digits", **data_config("autopeft_test_vit", 48))
    plan = PeftPlan.single(make_spec("bitfit"), [2])
    result = train("autopeft_test_vit", plan, data, TrainConfig(epochs=1, img_size=48, train_fraction=0.2,
                                                                 device="cpu"), pretrained=False)
    assert tuple(result.model.patch_embed.img_size) == (48, 48)
    assert result.model.pos_embed.shape[1] == 36 + 1


def test_params_counts_the_model_at_the_given_size() -> None:
    def params(*extra: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "autopeft", "params", "--backbone", DINOV2_REG, "--method",
                               "lora", "--json", *extra], capture_output=True, text=True, timeout=120, env=ENV)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    at224, native = params("--img-size", "224"), params()
    assert at224["input_size"] == [3, 224, 224] and native["input_size"] == [3, 518, 518]
    assert at224["backbone_params"] == backbone_spec(DINOV2_REG, 224).backbone_params == 21_629_952
    assert at224["percent"] > native["percent"]


def test_study_settings_carry_the_input_size() -> None:
    from autopeft.data.recipes import recipe_file
    from autopeft.search.engine import trial_settings
    from autopeft.search.settings import SearchSettings, settings_from

    shipped = settings_from(recipe_file("vtab1k-natural-dinov2"), {})
    assert shipped.img_size == 224 and "dinov2" in shipped.backbone  # DINOv2's recipe runs at the VTAB size
    asked = settings_from(None, {"img_size": 64, "backbone": DINOV2_REG})
    assert asked.img_size == 64 and trial_settings(asked).img_size == 64
    with pytest.raises(AutopeftError, match="--img-size must be a positive integer"):
        SearchSettings(img_size=0)


# -- the families, small: depth 2, width 64, 56-64 px, random weights ------------------------------------------------

SMALL = dict(depth=2, embed_dim=64, num_heads=2)
FAMILIES = {  # family -> (timm name, input size, creation keywords)
    "dinov2": ("vit_small_patch14_dinov2", 56, dict(SMALL, init_values=1e-2)),
    "dinov2_reg": (DINOV2_REG, 56, dict(SMALL, init_values=1e-2)),
    "deit3": ("deit3_small_patch16_224", 64, dict(SMALL, init_values=1e-2)),
    "clip": ("vit_base_patch16_clip_224", 64, SMALL),
    "siglip": ("vit_base_patch16_siglip_224", 64, SMALL),
}
# one case per method (options that reach the most code), as tests/test_methods.py's CASES name them
METHOD_CASES = {
    "full": {}, "linear": {}, "bitfit": {}, "ln_tune": {}, "partial": {"k": 1},
    "lora": {"rank": 2, "targets": "q,k,v,proj,fc1,fc2"}, "ssf": {}, "fact_tt": {"rank": 2},
    "adapter": {"dim": 4, "position": "both"}, "adaptformer": {"dim": 4, "input": "residual"}, "convpass": {"dim": 4},
    "vpt_shallow": {"length": 2}, "vpt_deep": {"length": 2}, "prefix": {"length": 2},
}
NUM_CLASSES = 5


def small(family: str, table: dict | None = None) -> tuple[Callable[[], torch.nn.Module], BackboneSpec]:
    """A factory of the family's small variant (the same random "pretrained" weights each call) and its spec.

    `table`: family -> (timm name, input size, creation keywords); FAMILIES by default."""
    name, size, kwargs = (FAMILIES if table is None else table)[family]

    def make() -> torch.nn.Module:
        torch.manual_seed(123)
        return create_backbone(name, num_classes=NUM_CLASSES, img_size=size, **kwargs).eval()

    return make, spec_of_model(make(), name)


def inputs(spec: BackboneSpec) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(4, *spec.input_size, generator=g), torch.randint(0, NUM_CLASSES, (4,), generator=g)


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_method_on_every_family(family: str, method: str, tmp_path) -> None:
    make, spec = small(family)
    plan = PeftPlan.single(make_spec(method, METHOD_CASES[method]), range(spec.num_blocks))
    check_invariants(make, spec, plan, *inputs(spec), tmp_path)


def test_method_cases_cover_every_method() -> None:
    assert set(METHOD_CASES) == {cls.name for cls in list_methods()}


# -- part 3: mergeability from the backbone --------------------------------------------------------------------------


def test_ssf_on_clip_folds_the_patch_shift_into_the_position_embedding() -> None:
    make, spec = small("clip")
    assert not spec.embed_bias and spec.pos_embed  # CLIP's patch embedding has no bias
    plan = PeftPlan.single(make_spec("ssf"), [0])
    assert plan.merge_blockers(spec) == []
    model = plan.apply(make(), spec)
    x, _ = inputs(spec)
    with torch.no_grad():
        model.patch_embed.proj.ssf_shift.normal_(std=0.5)  # a shift large enough to show
        before = model(x)
        pos = model.pos_embed.clone()
        merge_model(model)
        assert not torch.equal(model.pos_embed, pos)
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_ssf_where_qkv_has_no_bias_is_not_mergeable_and_merge_refuses_before_training(tmp_path) -> None:
    from safetensors.torch import save_file

    spec = backbone_spec("autopeft_test_vit_reg")
    plan = PeftPlan.single(make_spec("ssf"), range(spec.num_blocks))
    assert plan.mergeable  # the method can merge, this backbone cannot take it
    assert any("attn.qkv" in r for r in plan.merge_blockers(spec))
    assert PeftPlan.single(make_spec("lora"), [0]).merge_blockers(spec) == []
    weights = tmp_path / "w.safetensors"
    save_file(create_backbone("autopeft_test_vit_reg").state_dict(), str(weights))
    proc = subprocess.run([sys.executable, "-m", "autopeft", "train", "--dataset", "digits", "--backbone",
                           "autopeft_test_vit_reg", "--weights", str(weights), "--method", "ssf", "--merge", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=ENV)
    assert proc.returncode == 2 and "no bias to absorb its shift" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()  # refused before any training


# -- part 5: CLIP's norm_pre -----------------------------------------------------------------------------------------


def test_ln_tune_trains_clips_norm_pre_with_block_0() -> None:
    make, spec = small("clip")
    assert spec.pre_norm_params == 2 * spec.dims[0]
    with_0 = PeftPlan.single(make_spec("ln_tune"), [0])
    model = with_0.apply(make(), spec)
    assert all(p.requires_grad for p in model.norm_pre.parameters())
    assert with_0.count(spec) == spec.norm_params[0] + spec.pre_norm_params
    without = PeftPlan.single(make_spec("ln_tune"), [1]).apply(make(), spec)
    assert not any(p.requires_grad for p in without.norm_pre.parameters())
    # LN-tune with block 0 changes what block 0 sees: no cached prefix
    assert with_0.frozen_prefix(spec) == 0 and PeftPlan.single(make_spec("ln_tune"), [1]).frozen_prefix(spec) == 1


# -- part 4: attention-pool heads ------------------------------------------------------------------------------------


def test_siglips_attention_pool_is_its_own_group_that_partial_and_ln_tune_reach() -> None:
    make, spec = small("siglip")
    model = make()
    pool = sum(p.numel() for p in model.attn_pool.parameters())
    assert spec.pool_params == pool > 0 and spec.pool_norm_params == 2 * spec.dims[-1]
    with torch.device("meta"):
        whole = create_backbone(FAMILIES["siglip"][0], img_size=64, **FAMILIES["siglip"][2])
    assert spec.embed_params == sum(p.numel() for p in whole.patch_embed.parameters()) + whole.pos_embed.numel()
    partial = PeftPlan.single(make_spec("partial", {"k": 1}), ())
    trained = partial.apply(make(), spec)
    assert all(p.requires_grad for p in trained.attn_pool.parameters())
    assert partial.count(spec) == spec.block_params[-1] + spec.final_norm_params + pool
    ln = PeftPlan.single(make_spec("ln_tune"), [spec.num_blocks - 1]).apply(make(), spec)
    assert {n for n, p in ln.attn_pool.named_parameters() if p.requires_grad} == {"norm.weight", "norm.bias"}
    early = PeftPlan.single(make_spec("ln_tune"), [0]).apply(make(), spec)
    assert not any(p.requires_grad for p in early.attn_pool.parameters())


# -- part 2: LayerScale ----------------------------------------------------------------------------------------------

ADDITIONS = {"adapter": {"dim": 4, "position": "both"}, "adaptformer": {"dim": 4}, "convpass": {"dim": 4}}


def _up_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient of every up-projection (the zero-initialised output layer each of these methods has)."""
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if ".up.weight" in n])


def check_outside_layerscale(make: Callable[[], torch.nn.Module], spec: BackboneSpec, method: str) -> None:
    """On a backbone whose LayerScale γ is 1e-2: the addition is the identity at init under both placements, and
    inside, γ scales the up-projection's gradient by 1e-2 channel by channel; outside it does not."""
    x, y = inputs(spec)
    with torch.no_grad():
        plain = make()(x)
    grads = {}
    for where in ("outside", "inside"):
        plan = PeftPlan.single(make_spec(method, {**ADDITIONS[method], "layerscale": where}), range(spec.num_blocks))
        model = plan.apply(make(), spec)
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain, atol=1e-6, rtol=0)
        grads[where] = _up_grads(model, x, y)
    ratio = grads["inside"].norm() / grads["outside"].norm()
    assert ratio == pytest.approx(1e-2, rel=0.05)


@pytest.mark.parametrize("method", sorted(ADDITIONS))
@pytest.mark.parametrize("family", ["dinov2", "deit3"])
def test_additions_join_the_residual_outside_layerscale(family: str, method: str) -> None:
    make, spec = small(family)  # LayerScale at γ = 1e-2
    assert all(float(b.ls1.gamma.detach().abs().max()) == pytest.approx(1e-2) for b in make().blocks)
    check_outside_layerscale(make, spec, method)


def test_outside_layerscale_matches_a_backbone_whose_gamma_is_one() -> None:
    """With γ = 1 LayerScale is the identity: outside and inside compute the same function and gradient."""
    name, size, kwargs = FAMILIES["dinov2"]
    torch.manual_seed(123)
    base = create_backbone(name, num_classes=NUM_CLASSES, img_size=size, **dict(kwargs, init_values=1.0)).eval()
    spec = spec_of_model(base, name)
    x, y = inputs(spec)
    out = {}
    for where in ("outside", "inside"):
        torch.manual_seed(5)
        model = PeftPlan.single(make_spec("adaptformer", {"dim": 4, "layerscale": where}), [0, 1]).apply(
            copy.deepcopy(base), spec)
        for n, p in model.named_parameters():
            if ".up." in n:
                torch.nn.init.normal_(p, std=0.1)  # past initialisation: the adapter contributes
        with torch.no_grad():
            out[where] = model(x)
    torch.testing.assert_close(out["outside"], out["inside"], atol=1e-5, rtol=1e-5)


# -- part 7: `autopeft backbones` and README's family × method table --------------------------------------------------


def test_backbones_command_and_readme_table_agree(capsys) -> None:
    from autopeft.cli import main
    from autopeft.families import FAMILIES as LISTED

    assert main(["backbones", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    rows = {r["family"]: r for r in listed["families"]}
    assert set(rows) == {f.name for f in LISTED} and "Eva" not in listed["refused"]
    assert rows["DINOv2"]["input_size"] == 518 and "convpass" not in rows["Swin"]["methods"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    header = next(line for line in readme if line.startswith("| family | timm class |"))
    methods = [c.strip() for c in header.strip("|").split("|")][4:]
    assert methods == sorted(cls.name for cls in list_methods())
    for line in readme[readme.index(header) + 2 : readme.index(header) + 2 + len(rows)]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        row = rows[cells[0]]
        assert cells[1] == row["class"] and int(cells[2]) == row["input_size"]
        assert cells[3] == f"{row['params'] / 1e6:.1f} M"
        for method, mark in zip(methods, cells[4:], strict=True):
            expected = "·" if method not in row["methods"] else "○" if method in row["not_mergeable"] else "✓"
            assert mark == expected, (cells[0], method)


def test_a_class_autopeft_does_not_adapt_is_refused_naming_it() -> None:
    with pytest.raises(AutopeftError, match="timm's ConvNeXt class is not supported.*SwinTransformer and Eva classes"):
        backbone_spec("convnext_atto")
