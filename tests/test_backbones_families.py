"""The backbones people fine-tune today (DINOv2 with and without registers, DeiT-III, CLIP, SigLIP, the Eva family)
at the input size the user chooses: small random-initialised variants (depth 2, 56-64 px) through the invariant
checks of tests/test_methods.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from autopeft.backbones import backbone_spec, create_backbone
from autopeft.data import data_config
from autopeft.errors import AutopeftError
from autopeft.recipe import Recipe
from autopeft.train_config import SPACE_TRAINING_KEYS, TrainConfig, check_training

DINOV2_REG = "vit_small_patch14_reg4_dinov2"


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
                               "lora", "--json", *extra], capture_output=True, text=True, timeout=120)
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
