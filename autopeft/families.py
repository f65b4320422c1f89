"""The backbone families autopeft adapts: an example timm name for each, its input size, parameter count and the
methods that go on it (`autopeft backbones`, README's family × method table)."""

from __future__ import annotations

from dataclasses import dataclass

from autopeft.backbones import backbone_spec
from autopeft.errors import AutopeftError
from autopeft.methods import list_methods, make_spec
from autopeft.plan import PeftPlan


@dataclass(frozen=True)
class Family:
    name: str
    timm_class: str
    examples: tuple[str, ...]  # timm names; the first is the one counted
    note: str = ""


FAMILIES = (
    Family("ViT (supervised, AugReg)", "VisionTransformer",
           ("vit_base_patch16_224.augreg_in21k", "vit_small_patch16_224")),
    Family("DeiT-III", "VisionTransformer", ("deit3_base_patch16_224", "deit3_small_patch16_224"),
           "LayerScale: adapter, AdaptFormer and Convpass add outside it"),
    Family("DINOv2", "VisionTransformer", ("vit_base_patch14_dinov2.lvd142m", "vit_small_patch14_dinov2"),
           "pretrained at 518 px: --img-size 224 for the VTAB protocol; LayerScale"),
    Family("DINOv2 with registers", "VisionTransformer",
           ("vit_base_patch14_reg4_dinov2.lvd142m", "vit_small_patch14_reg4_dinov2"),
           "pretrained at 518 px: --img-size 224 for the VTAB protocol; LayerScale"),
    Family("CLIP", "VisionTransformer", ("vit_base_patch16_clip_224.openai", "vit_base_patch16_clip_224"),
           "no patch-embedding bias (SSF folds its shift into pos_embed); norm_pre trains under ln_tune with block 0"),
    Family("SigLIP", "VisionTransformer", ("vit_base_patch16_siglip_224.webli", "vit_base_patch16_siglip_224"),
           "attention-pool head: trained by partial, its norms by ln_tune, with the last block"),
    Family("Swin", "SwinTransformer", ("swin_base_patch4_window7_224.ms_in22k", "swin_tiny_patch4_window7_224")),
    Family("EVA-02", "Eva", ("eva02_base_patch14_224.mim_in22k", "eva02_tiny_patch14_224"),
           "rope; q/v biases beside a fused qkv (tiny, small) or separate q/k/v (base, large); SwiGLU 8/3 wide, which "
           "FacT's d × d pieces do not tile (fact_tt on q,k,v,proj only); SSF does not merge: k has no bias"),
    Family("DINOv3", "Eva", ("vit_base_patch16_dinov3.lvd1689m", "vit_small_patch16_dinov3"),
           "rope, 4 registers; LayerScale as block parameters: adapter, AdaptFormer and Convpass add outside it; "
           "SSF does not merge: qkv (k in the _qkvb variants) has no bias"),
    Family("Perception Encoder", "Eva", ("vit_pe_core_base_patch16_224.fb", "vit_pe_core_small_patch16_384"),
           "rope; timm's AttentionRope"),
    Family("rope ViT", "Eva", ("vit_base_patch16_rope_224.naver_in1k", "vit_small_patch16_rope_224"),
           "rope (per block in the _mixed variants); LayerScale as block parameters"),
)
# Refused: the class and why (the refusal `family_of` raises names the class too). Within Eva, `backbones` refuses
# grouped-query attention and patch dropout by their classes.
REFUSED: dict[str, str] = {}

def methods_on(name: str, img_size: int | None = None) -> dict[str, bool]:
    """Each method that goes on backbone `name` on all its blocks -> whether it merges there."""
    spec = backbone_spec(name, img_size)
    out = {}
    for cls in list_methods():
        plan = PeftPlan.single(make_spec(cls.name), range(spec.num_blocks))
        try:
            plan.count(spec)
        except AutopeftError:
            continue
        out[cls.name] = plan.mergeable_on(spec)
    return out


def family_table(img_size: int | None = None) -> list[dict]:
    """One row per family: its example names, input size, parameter count (head excluded) and methods."""
    rows = []
    merges_somewhere = {cls.name: cls.mergeable for cls in list_methods()}
    for f in FAMILIES:
        name = f.examples[-1]  # an architecture name: no weights are read
        spec = backbone_spec(name, img_size)
        methods = methods_on(name, img_size)
        rows.append({"family": f.name, "class": f.timm_class, "examples": list(f.examples),
                     "input_size": spec.input_size[1], "params": spec.backbone_params, "blocks": spec.num_blocks,
                     "methods": sorted(methods), "not_mergeable": sorted(m for m, ok in methods.items()
                                                                        if not ok and merges_somewhere[m]),
                     "note": f.note})
    return rows
