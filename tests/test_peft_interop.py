"""Hugging Face peft interop: a LoRA-only run loads with peft.PeftModel.from_pretrained and gives autopeft's logits."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from autopeft.backbones import backbone_spec, create_backbone
from autopeft.cli import main
from autopeft.errors import AutopeftError
from autopeft.methods import make_spec
from autopeft.peft_interop import check_lora_only, export_peft, module_loras
from autopeft.plan import PeftPlan, save_adapter
from autopeft.recipe import Recipe
from autopeft.runs import load_run
from autopeft.train import build_model

peft = pytest.importorskip("peft")

# Two LoRA entries on block 1 stack on its fused qkv with different scales; slices q,v and k leave gaps.
MIXED = PeftPlan(blocks={
    0: (make_spec("lora", {"rank": 2, "alpha": 8, "targets": "q,v"}),),
    1: (make_spec("lora", {"rank": 2, "alpha": 8, "targets": "q,v"}),
        make_spec("lora", {"rank": 3, "alpha": 1.5, "targets": "k,proj,fc1"})),
    2: (make_spec("lora", {"rank": 1, "targets": "fc2"}),),
})


def fake_run(tmp_path, backbone: str, plan: PeftPlan, num_classes: int = 7):
    """A run directory as `autopeft train` leaves it, with random (non-zero) LoRA B matrices and head."""
    weights = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_file(create_backbone(backbone).state_dict(), str(weights))
    model, _ = build_model(backbone, plan, num_classes, str(weights))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)  # B starts at zero: randomise everything trainable so the check has teeth
    run = tmp_path / "run"
    run.mkdir()
    Recipe(backbone=backbone, dataset="digits", plan=plan, epochs=1, weights=str(weights),
           num_classes=num_classes).save(run / "recipe.yaml")
    (run / "metrics.json").write_text(json.dumps({"num_classes": num_classes}))
    save_adapter(model, run / "adapter.safetensors")
    return run, model.eval(), weights


@pytest.mark.parametrize("backbone", ["autopeft_test_vit", "autopeft_test_vit_reg", "autopeft_test_swin"])
def test_peft_loads_the_export_with_equal_logits(tmp_path, backbone) -> None:
    plan = MIXED if backbone != "autopeft_test_swin" else PeftPlan.single(make_spec("lora", {"rank": 2}), range(4))
    run_dir, ours, weights = fake_run(tmp_path, backbone, plan)
    out = export_peft(load_run(run_dir), tmp_path / "peft")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["head"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert any(k.startswith("base_model.model.head.") for k in tensors)

    base = timm.create_model(backbone, pretrained=True, num_classes=7, pretrained_cfg_overlay={"file": str(weights)})
    theirs = peft.PeftModel.from_pretrained(base, str(out)).eval()
    x = torch.randn(3, *backbone_spec(backbone).input_size)
    with torch.no_grad():
        assert torch.allclose(theirs(x), ours(x), atol=1e-5, rtol=0)
        assert (ours(x) - timm.create_model(backbone, num_classes=7).eval()(x)).abs().max() > 1e-2


def test_stacked_module_ranks_and_scales() -> None:
    model, _ = build_model("autopeft_test_vit", MIXED, 7, pretrained=False)
    loras = {m.path: m for m in module_loras(model)}
    assert sorted(loras) == ["blocks.0.attn.qkv", "blocks.1.attn.proj", "blocks.1.attn.qkv", "blocks.1.mlp.fc1",
                             "blocks.2.mlp.fc2"]
    assert loras["blocks.0.attn.qkv"].rank == 4 and loras["blocks.0.attn.qkv"].scale == 4.0
    assert loras["blocks.0.attn.qkv"].alpha == 16.0  # peft's alpha / r = 16 / 4 keeps autopeft's 8 / 2
    # block 1's qkv holds two LoRAs of different scales (4 and 0.5): rank 2+2+3, scales folded into B
    assert loras["blocks.1.attn.qkv"].rank == 7 and loras["blocks.1.attn.qkv"].scale == 1.0
    assert loras["blocks.1.attn.proj"].scale == 0.5 and loras["blocks.2.mlp.fc2"].scale == 1.0


@pytest.mark.parametrize(
    "plan,needle",
    [
        (PeftPlan.single(make_spec("adapter", {"dim": 4}), range(3)), "this plan has adapter"),
        (PeftPlan(blocks={0: (make_spec("lora"), make_spec("ssf"))}), "this plan has ssf"),
        (PeftPlan.single(make_spec("linear"), []), "this plan has linear"),
        (PeftPlan(), "no LoRA part"),
    ],
)
def test_only_lora_plans_export(plan, needle) -> None:
    with pytest.raises(AutopeftError, match=needle):
        check_lora_only(plan)


def test_cli_refuses_non_lora_and_existing_dirs(tmp_path, capsys) -> None:
    run_dir, _, _ = fake_run(tmp_path, "autopeft_test_vit", PeftPlan.single(make_spec("adapter"), range(3)))
    assert main(["export-peft", "--run", str(run_dir), "-o", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "LoRA alone" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "p").exists()
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    lora_run, _, _ = fake_run(lora_dir, "autopeft_test_vit", PeftPlan.single(make_spec("lora"), range(3)))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep").write_text("x")
    assert main(["export-peft", "--run", str(lora_run), "-o", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export-peft", "--run", str(lora_run), "-o", str(tmp_path / "ok")]) == 0
    assert "checked" in capsys.readouterr().out
