"""PeftPlan: construction, validation, (de)serialisation and layer parsing."""

from __future__ import annotations

import pytest

from autopeft.backbones import backbone_spec
from autopeft.errors import AutopeftError
from autopeft.methods import make_spec
from autopeft.plan import PeftPlan, parse_layers

MIXED = {
    "version": 1,
    "blocks": {"0": [{"method": "lora", "rank": 8, "alpha": 16, "targets": ["q", "v"]}],
               "2": [{"method": "adaptformer", "dim": 8}, {"method": "vpt_deep", "length": 5}]},
    "global": [{"method": "vpt_shallow", "length": 10}],
}


def test_yaml_round_trip_is_stable(tmp_path) -> None:
    plan = PeftPlan.from_dict(MIXED)
    path = tmp_path / "plan.yaml"
    plan.save(path)
    again = PeftPlan.load(path)
    assert again == plan
    assert again.to_yaml() == plan.to_yaml()
    assert PeftPlan.from_dict(plan.to_dict()).to_json() == plan.to_json()


def test_groups_follow_application_order() -> None:
    plan = PeftPlan.from_dict(MIXED)
    names = [s.name for s, _ in plan.groups()]
    assert names == ["lora", "adaptformer", "vpt_deep", "vpt_shallow"]
    assert plan.short() == "lora(rank=8,alpha=16.0)@0 + adaptformer@2 + vpt_deep(length=5)@2 + vpt_shallow"


def test_same_spec_on_several_blocks_forms_one_group() -> None:
    plan = PeftPlan.single(make_spec("lora", {"rank": 2}), [0, 1, 2, 5])
    assert [(s.name, b) for s, b in plan.groups()] == [("lora", (0, 1, 2, 5))]
    assert plan.short() == "lora(rank=2)@0-2,5"
    assert make_spec("lora", {"targets": ["q", "k"]}).short() == "lora(targets=qk)"
    assert make_spec("lora", {"targets": ["q", "fc1"]}).short() == "lora(targets=q+fc1)"  # not `qfc1`


def test_global_method_ignores_layers() -> None:
    plan = PeftPlan.single(make_spec("vpt_shallow", {"length": 4}), [0, 1])
    assert plan.blocks == {} and plan.global_parts[0].length == 4


@pytest.mark.parametrize(
    "data,message",
    [
        ({"version": 2, "blocks": {}}, "version 2 is not supported"),
        ({"blocks": {"x": []}}, "not a block index"),
        ({"blocks": {"0": {"method": "lora"}}}, "must hold a list"),
        ({"blocks": {"0": [{"rank": 3}]}}, "'method' key"),
        ({"blocks": {"0": [{"method": "vpt_shallow"}]}}, "put it under 'global'"),
        ({"global": [{"method": "lora"}]}, "put it under 'blocks'"),
        ({"blocks": {"0": [{"method": "lora"}, {"method": "lora"}]}}, "twice"),
        ({"layers": {}}, "unknown plan key"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_bad_plans(data, message: str) -> None:
    with pytest.raises(AutopeftError, match=message):
        PeftPlan.from_dict(data)


def test_plan_outside_backbone_is_rejected() -> None:
    plan = PeftPlan.single(make_spec("lora"), [0, 7])
    with pytest.raises(AutopeftError, match=r"block\(s\) \[7\]"):
        plan.count(backbone_spec("autopeft_test_vit"))


def test_load_errors(tmp_path) -> None:
    with pytest.raises(AutopeftError, match="does not exist"):
        PeftPlan.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("blocks: [unclosed\n")
    with pytest.raises(AutopeftError, match="not valid YAML"):
        PeftPlan.load(bad)
    evil = tmp_path / "evil.yaml"
    evil.write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(AutopeftError):
        PeftPlan.load(evil)


@pytest.mark.parametrize(
    "text,expected",
    [("all", (0, 1, 2, 3)), (None, (0, 1, 2, 3)), ("0-2", (0, 1, 2)), ("3,1", (1, 3)), ("0-1,3", (0, 1, 3))],
)
def test_parse_layers(text, expected) -> None:
    assert parse_layers(text, 4) == expected


@pytest.mark.parametrize("text", ["4", "2-1", "a", "1-", "-1"])
def test_parse_layers_errors(text: str) -> None:
    with pytest.raises(AutopeftError):
        parse_layers(text, 4)


def test_vit_base_counts_match_the_literature() -> None:
    spec = backbone_spec("vit_base_patch16_224")
    assert spec.backbone_params == 85_798_656 and spec.num_blocks == 12
    # LoRA r=8 on q,v of all 12 blocks: 12 · 2 · 8 · (768 + 768)
    assert PeftPlan.single(make_spec("lora", {"rank": 8}), range(12)).count(spec) == 294_912
    # BitFit on ViT-B/16 blocks: 12 · (3·768 + 768 + 3072 + 768 + 2·768) = 0.1 M
    assert PeftPlan.single(make_spec("bitfit"), range(12)).count(spec) == 12 * (3 * 768 + 768 + 3072 + 768 + 1536)
    # VPT-deep with 10 prompts: 12 · 10 · 768 (0.09 M, as the VPT tables report)
    assert PeftPlan.single(make_spec("vpt_deep"), range(12)).count(spec) == 92_160
