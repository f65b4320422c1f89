"""Hugging Face peft interop: a run of a LoRA-only plan as a peft LoRA adapter directory.

peft puts one LoRA on a Linear module (`blocks.0.attn.qkv`); autopeft puts one per target and, on timm's fused qkv,
updates only the chosen q/k/v row slices. Those slices together are still one low-rank update of the whole qkv
Linear, of rank r·(number of slices): A stacks the slices' A rows, and B is block-diagonal in the output (each
slice's B in its own rows and rank columns, zeros elsewhere). LoRAs stacked on one Linear by several plan entries
stack the same way. peft's scale is lora_alpha / r, so each module gets its rank and alpha through `rank_pattern` /
`alpha_pattern`; the trained head travels as `modules_to_save=["head"]`.

    autopeft export-peft --run runs/NAME -o DIR
    PeftModel.from_pretrained(timm.create_model(backbone, pretrained=True, num_classes=K), DIR)  # same logits
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autopeft.backbones import backbone_spec, create_backbone
from autopeft.errors import AutopeftError
from autopeft.methods.base import Wrapper
from autopeft.methods.lora import LoraLinear
from autopeft.plan import PeftPlan
from autopeft.runs import Run


@dataclass
class ModuleLora:
    """One peft LoRA: the Linear's path in the plain timm model, stacked A (R×in) and B (out×R), and the scale."""

    path: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def alpha(self) -> float:
        return self.scale * self.rank  # peft's scaling = lora_alpha / r


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise AutopeftError("export-peft needs Hugging Face peft: pip install peft") from None
    return peft


def check_lora_only(plan: PeftPlan) -> None:
    """Refuse, in one line, a plan that is not made of LoRA alone."""
    others = sorted({s.name for s in plan.methods()} - {"lora"})
    if others or not plan.methods():
        what = ", ".join(others) if others else "no LoRA part (a linear probe)"
        raise AutopeftError(f"export-peft takes plans made of LoRA alone; this plan has {what}; use the run's "
                            "adapter.safetensors with autopeft, or merged.safetensors for a plain timm model")


def _wrapped_linears(model: nn.Module, prefix: str = "") -> dict[str, list[LoraLinear]]:
    """Path of each wrapped Linear in the plain model -> the LoraLinear wrappers on it (outermost first)."""
    out: dict[str, list[LoraLinear]] = {}
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, Wrapper):  # wrappers nest through `.base`; the plain model has the Linear at `path`
            while isinstance(child, Wrapper):
                if isinstance(child, LoraLinear):
                    out.setdefault(path, []).append(child)
                child = child.base
        for sub, wrappers in _wrapped_linears(child, f"{path}.").items():
            out.setdefault(sub, []).extend(wrappers)
    return out


def module_loras(model: nn.Module) -> list[ModuleLora]:
    """Every LoRA of an adapted model as one peft LoRA per Linear (see the module docstring)."""
    out = []
    for path, wrappers in sorted(_wrapped_linears(model).items()):
        pieces = [(w, t) for w in wrappers for t in w.slices]
        scales = {w.scale for w in wrappers}
        # one scale for the whole module: the plan's when all its LoRAs share one, else 1 with each scale in its B
        scale = scales.pop() if len(scales) == 1 else 1.0
        rank = sum(w.lora_A[t].shape[0] for w, t in pieces)
        first = pieces[0][0].lora_A[pieces[0][1]]
        A = first.new_zeros(rank, first.shape[1])
        B = first.new_zeros(pieces[0][0].out_features, rank)
        col = 0
        with torch.no_grad():
            for w, t in pieces:
                start, size = w.slices[t]
                r = w.lora_A[t].shape[0]
                A[col : col + r] = w.lora_A[t]
                factor = w.scale / scale
                B[start : start + size, col : col + r] = w.lora_B[t] if factor == 1.0 else w.lora_B[t] * factor
                col += r
        out.append(ModuleLora(path, A.detach().cpu(), B.detach().cpu(), float(scale)))
    return out


def lora_config(loras: list[ModuleLora]) -> Any:
    """A peft LoraConfig targeting exactly these Linears with their ranks and alphas."""
    peft = _peft()
    keys = {m.path: re.escape(m.path) for m in loras}  # peft reads pattern keys as regular expressions
    return peft.LoraConfig(
        r=loras[0].rank,
        lora_alpha=loras[0].alpha,
        target_modules=[m.path for m in loras],
        rank_pattern={keys[m.path]: m.rank for m in loras},
        alpha_pattern={keys[m.path]: m.alpha for m in loras},
        lora_dropout=0.0,
        bias="none",
        modules_to_save=["head"],
    )


def export_peft(run: Run, out: str | Path) -> Path:
    """Write the run's LoRA adapter as a peft adapter directory (adapter_config.json, adapter_model.safetensors).

    The directory appears only when complete; an existing non-empty one is refused.
    """
    from autopeft.deploy import num_classes_of
    from autopeft.plan import load_adapter
    from autopeft.runs import check_out_dir, staged_dir
    from autopeft.train import build_model

    check_lora_only(run.recipe.plan)
    peft = _peft()
    out_path = check_out_dir(out)
    k = num_classes_of(run)
    # adapter + head only
    ours, _ = build_model(run.recipe.backbone, run.recipe.plan, k, pretrained=False, img_size=run.recipe.img_size)
    load_adapter(ours, run.adapter)
    loras = module_loras(ours)
    # peft saves only the adapter and the head, so the base weights of this skeleton do not matter
    base = create_backbone(run.recipe.backbone, num_classes=k, img_size=run.recipe.img_size)
    base.get_submodule("head").load_state_dict(ours.get_submodule("head").state_dict())
    model = peft.get_peft_model(base, lora_config(loras))
    with torch.no_grad():
        for m in loras:
            layer = model.base_model.model.get_submodule(m.path)
            layer.lora_A["default"].weight.copy_(m.A)
            layer.lora_B["default"].weight.copy_(m.B)
    with staged_dir(out_path) as tmp:
        model.save_pretrained(str(tmp))
    return out_path


def check_peft_export(run: Run, directory: str | Path, weights: str | None = None, images: int = 4) -> float:
    """Max |logit difference| between autopeft's model and peft's load of `directory` on random inputs."""
    from autopeft.deploy import load_model, num_classes_of

    peft = _peft()
    recipe = run.recipe
    ours = load_model(run, weights=weights)
    base = create_backbone(recipe.backbone, num_classes=num_classes_of(run), pretrained=True,
                           weights=weights or recipe.weights, img_size=recipe.img_size)
    theirs = peft.PeftModel.from_pretrained(base, str(directory)).eval()
    size = backbone_spec(recipe.backbone, recipe.img_size).input_size
    x = torch.randn(images, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((ours(x) - theirs(x)).abs().max())
