"""timm backbones: creation (hub or local weights) and the BackboneSpec every method counts against."""

from __future__ import annotations

import functools
import os
import pickle
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.eva import Eva
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from autopeft.errors import AutopeftError
from autopeft.eva import check_eva

FAMILIES = ("vit", "swin", "eva")  # eva: timm's Eva class (EVA-02, DINOv3, PE, the rope ViTs)
# The bundled tiny ViT pretrained on Fashion-MNIST (autopeft/bundled): the offline default of every command.
from autopeft.defaults import DEFAULT_BACKBONE  # noqa: E402,F401  (re-exported)

# Parameters whose names start with one of these belong to the classifier, which is always trained and reported
# apart from the PEFT parameters (as the benchmark tables count them).
HEAD_PREFIXES = ("head",)


# timm's register_model reads the pretrained configs of a module from its `default_cfgs`.
_TEST_CFG = dict(num_classes=1000, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
default_cfgs = generate_default_cfgs(
    {
        "autopeft_test_swin": dict(input_size=(3, 56, 56), classifier="head.fc", **_TEST_CFG),
        "autopeft_test_vit": dict(input_size=(3, 32, 32), classifier="head", **_TEST_CFG),
        "autopeft_test_vit_reg": dict(input_size=(3, 32, 32), classifier="head", **_TEST_CFG),
        "autopeft_test_eva": dict(input_size=(3, 32, 32), classifier="head", **_TEST_CFG),
    }
)


@register_model
def autopeft_test_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """A 3-block ViT (32 px, patch 8, dim 32) for fast CPU tests; random weights only."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0)
    return build_model_with_cfg(VisionTransformer, "autopeft_test_vit", pretrained, **dict(args, **kwargs))


@register_model
def autopeft_test_vit_reg(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Like autopeft_test_vit with 2 register tokens, average pooling and no qkv bias: the less common ViT paths."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=4.0, reg_tokens=2,
                global_pool="avg", class_token=True, qkv_bias=False)
    return build_model_with_cfg(VisionTransformer, "autopeft_test_vit_reg", pretrained, **dict(args, **kwargs))


@register_model
def autopeft_test_eva(pretrained: bool = False, **kwargs: Any) -> Eva:
    """A 3-block Eva (32 px, patch 8, dim 32) with rope, q/v biases beside a fused qkv, SwiGLU and LayerScale
    parameters: the Eva paths in fast CPU tests; random weights only."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, swiglu_mlp=True,
                use_rot_pos_emb=True, ref_feat_shape=(4, 4), init_values=0.1)
    return build_model_with_cfg(Eva, "autopeft_test_eva", pretrained, **dict(args, **kwargs))


@register_model
def autopeft_test_swin(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """A two-stage Swin small enough for CPU tests (56 px, window 7, dims 16/32); random weights only."""
    args = dict(img_size=56, patch_size=4, window_size=7, embed_dim=16, depths=(2, 2), num_heads=(1, 2))
    return build_model_with_cfg(SwinTransformer, "autopeft_test_swin", pretrained, **dict(args, **kwargs))


@dataclass(frozen=True)
class BackboneSpec:
    """What a method needs to know about a backbone to count and insert parameters, without weights.

    Per-block lists are indexed by the global block index (Swin stages are flattened in order).
    """

    name: str
    family: str
    num_blocks: int
    dims: tuple[int, ...]
    heads: tuple[int, ...]
    mlp_hidden: tuple[int, ...]
    qkv_bias: tuple[bool, ...]
    block_params: tuple[int, ...]
    bias_params: tuple[int, ...]
    norm_params: tuple[int, ...]
    norm_bias_params: tuple[int, ...]
    num_patches: int
    num_prefix_tokens: int
    grid: tuple[int, int]
    embed_params: int
    final_norm_params: int
    backbone_params: int
    head_in_features: int
    input_size: tuple[int, int, int]
    # What decides whether a shift (SSF) folds into the weights: per block, the paths (inside the block) of the
    # modules with a weight but no bias; whether the patch embedding has a bias; whether a learned absolute position
    # embedding is added to the patch tokens after it (a shift of the patch embedding folds into it); whether the
    # final norm has a bias.
    no_bias: tuple[tuple[str, ...], ...] = ()
    embed_bias: bool = True
    pos_embed: bool = False
    final_norm_bias: bool = True
    # a norm between the embedding and block 0 (CLIP's `norm_pre`): trained by LN-tune with block 0
    pre_norm_params: int = 0
    # an attention-pool head between the final norm and the classifier (SigLIP's `map`): trained by partial and, its
    # norms, by LN-tune, as they train the last block; frozen (not embedding) otherwise
    pool_params: int = 0
    pool_norm_params: int = 0
    # per block, the output widths of the MLP's input projection(s): (hidden,) for a plain MLP, (2·hidden,) for a
    # packed gated one (GluMlp), (hidden, hidden) for SwiGLU's separate gate and value projections; () reads
    # (mlp_hidden[i],) for every block (specs stored before this field)
    fc1_outs: tuple[tuple[int, ...], ...] = ()

    def fc1_widths(self, i: int) -> tuple[int, ...]:
        """The output widths of block `i`'s MLP input projection(s); `mlp_hidden[i]` is fc2's input width."""
        return self.fc1_outs[i] if self.fc1_outs else (self.mlp_hidden[i],)

    def head_params(self, num_classes: int) -> int:
        """Parameters of a linear classifier for `num_classes` classes on this backbone."""
        return self.head_in_features * num_classes + num_classes if num_classes > 0 else 0

    def unfrozen_params(self, parts: set[tuple[str, int]]) -> int:
        """Size of the union of existing parameter groups made trainable.

        Parts are `("all", i)`, `("bias", i)`, `("norm", i)` for block i, `("embed", 0)` (the embedding, without the
        pre-norm), `("pre_norm", 0)`, `("final_norm", 0)`, `("pool", 0)` (an attention-pool head) and
        `("pool_norm", 0)` (its norms).
        Methods that unfreeze existing weights (BitFit, LN-tune, partial, full) overlap (norm biases are both
        biases and norm parameters); counting the union keeps a plan's count exact when they are combined.
        """
        total = 0
        for i in {i for kind, i in parts if kind in ("all", "bias", "norm")}:
            if ("all", i) in parts:
                total += self.block_params[i]
                continue
            has_bias, has_norm = ("bias", i) in parts, ("norm", i) in parts
            total += has_bias * self.bias_params[i] + has_norm * self.norm_params[i]
            total -= (has_bias and has_norm) * self.norm_bias_params[i]
        total += ("embed", 0) in parts and self.embed_params
        total += ("pre_norm", 0) in parts and self.pre_norm_params
        if ("pool", 0) in parts:
            total += self.pool_params
        elif ("pool_norm", 0) in parts:
            total += self.pool_norm_params
        total += ("final_norm", 0) in parts and self.final_norm_params
        return int(total)

    def to_dict(self) -> dict:
        return asdict(self)


def pretrained_drop_path(name: str) -> float | None:
    """The drop-path rate `name`'s weights were pretrained with, where autopeft knows it (its bundled backbone,
    pretrained without), else None (the run's setting stands)."""
    from autopeft.bundled import PRETRAINED_DROP_PATH
    from autopeft.defaults import BUNDLED_BACKBONE

    return PRETRAINED_DROP_PATH if name == BUNDLED_BACKBONE else None


def is_head_param(name: str) -> bool:
    return name.split(".", 1)[0].startswith(HEAD_PREFIXES)


def family_of(model: nn.Module) -> str:
    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, SwinTransformer):
        return "swin"
    if isinstance(model, Eva):
        return "eva"
    from autopeft.families import REFUSED

    why = f" ({REFUSED[type(model).__name__]})" if type(model).__name__ in REFUSED else ""
    raise AutopeftError(
        f"timm's {type(model).__name__} class is not supported{why}; autopeft adapts timm's VisionTransformer, "
        "SwinTransformer and Eva classes (see `autopeft backbones`)"
    )


def check_supported(model: nn.Module) -> str:
    """`family_of` a freshly built model, refusing the variants of a family that autopeft does not adapt."""
    family = family_of(model)
    if family == "eva":
        check_eva(model)
    return family


def linear_sites(block: nn.Module, target: str) -> list[tuple[str, int, int]]:
    """Where `target` (q, k, v, proj, fc1, fc2) lives in `block`: (module path inside the block, first output row,
    rows) for each Linear holding it. q, k and v are row slices of a fused `attn.qkv` or their own projections
    (Eva's `q_proj`, `k_proj`, `v_proj`); fc1 is one Linear, packed gate and value (GluMlp) included, or SwiGLU's
    two (`fc1_g`, `fc1_x`)."""
    b: Any = block
    if target in ("q", "k", "v"):
        qkv = getattr(b.attn, "qkv", None)
        if qkv is None:
            return [(f"attn.{target}_proj", 0, _linear(b.attn.get_submodule(f"{target}_proj")).out_features)]
        d = _linear(qkv).out_features // 3
        return [("attn.qkv", "qkv".index(target) * d, d)]
    if target == "proj":
        return [("attn.proj", 0, _linear(b.attn.proj).out_features)]
    if target == "fc1" and getattr(b.mlp, "fc1", None) is None:
        return [(f"mlp.{n}", 0, _linear(b.mlp.get_submodule(n)).out_features) for n in ("fc1_g", "fc1_x")]
    return [(f"mlp.{target}", 0, _linear(b.mlp.get_submodule(target)).out_features)]


def _linear(module: nn.Module) -> Any:
    """The Linear under any method wrappers (each holds its inner module as `base`)."""
    inner: Any = module
    while not isinstance(inner, nn.Linear) and isinstance(getattr(inner, "base", None), nn.Module):
        inner = inner.base
    return inner


def get_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a supported timm model, in forward order."""
    m = _dynamic(model)
    if family_of(model) != "swin":
        return list(m.blocks)
    return [block for stage in m.layers for block in stage.blocks]


def block_path(model: nn.Module, index: int) -> str:
    """The module path of block `index` (e.g. `blocks.3` or `layers.1.blocks.0`)."""
    m = _dynamic(model)
    if family_of(model) != "swin":
        return f"blocks.{index}"
    i = index
    for s, stage in enumerate(m.layers):
        if i < len(stage.blocks):
            return f"layers.{s}.blocks.{i}"
        i -= len(stage.blocks)
    raise IndexError(index)


def final_norm_modules(model: nn.Module) -> list[nn.Module]:
    """Norms between the last block and the classifier (trained by `partial`)."""
    mods = [getattr(model, "norm", None), getattr(model, "fc_norm", None)]
    return [m for m in mods if isinstance(m, nn.Module) and any(True for _ in m.parameters())]


def pre_norm_modules(model: nn.Module) -> list[nn.Module]:
    """Norms between the embedding and block 0 (CLIP's `norm_pre`), trained by LN-tune with block 0."""
    norm = getattr(model, "norm_pre", None)
    return [norm] if isinstance(norm, nn.Module) and any(True for _ in norm.parameters()) else []


def pool_modules(model: nn.Module) -> list[nn.Module]:
    """An attention-pool head between the final norm and the classifier (SigLIP's `attn_pool`, global_pool `map`)."""
    pool = getattr(model, "attn_pool", None)
    return [pool] if isinstance(pool, nn.Module) and any(True for _ in pool.parameters()) else []


def _dynamic(model: nn.Module) -> Any:
    """`model` typed for reading timm's submodules by attribute (nn.Module's stubs type each as Tensor | Module)."""
    return model


def _numel(module: nn.Module, predicate: Callable[[str, nn.Parameter], bool] = lambda name, p: True) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if predicate(n, p))


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's, or a leaf module whose class says Norm (timm's RmsNorm; not a block such as
    timm's EvaBlockPostNorm)."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
        return True
    return "Norm" in type(module).__name__ and next(module.children(), None) is None


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8] if name else []
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise AutopeftError(f"unknown backbone '{name}'{hint}; any timm vit_*, deit_* or swin_* name works")


def size_kwargs(img_size: int | None) -> dict[str, Any]:
    """`timm.create_model` keywords for an input of `img_size` px (none for the backbone's pretraining size)."""
    return {} if img_size is None else {"img_size": int(img_size)}


def check_img_size(img_size: int | None) -> None:
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1):
        raise AutopeftError(f"--img-size must be a positive integer (pixels), got {img_size!r}")


@functools.lru_cache(maxsize=64)
def backbone_spec(name: str, img_size: int | None = None) -> BackboneSpec:
    """Build (and cache) the spec of a timm backbone from its architecture alone, on the meta device.

    `img_size`: the input size the model runs at (None: its pretraining size). The token grid, the position
    embedding and so the parameter count follow it, as they do for the model `create_backbone` builds at that size.
    """
    _check_name(name)
    check_img_size(img_size)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **size_kwargs(img_size))
        if img_size is not None:  # the architecture's own constraints (patch and window multiples), without weights
            try:
                model(torch.empty(1, 3, img_size, img_size))
            except Exception as exc:  # noqa: BLE001  timm asserts or raises its own types per architecture
                raise AutopeftError(f"{name} cannot run at --img-size {img_size}: {_brief(exc)}") from None
    return spec_of_model(model, name)


def spec_of_model(module: nn.Module, name: str) -> BackboneSpec:
    model = _dynamic(module)
    family = check_supported(model)
    blocks: list[Any] = get_blocks(model)
    dims, heads, hidden, qkv_bias, fc1_outs = [], [], [], [], []
    for b in blocks:
        dims.append(b.attn.proj.out_features)
        heads.append(b.attn.num_heads)
        hidden.append(b.mlp.fc2.in_features)
        fc1_outs.append(tuple(rows for _, _, rows in linear_sites(b, "fc1")))
        q = linear_sites(b, "q")[0][0]
        qkv_bias.append(_linear(b.get_submodule(q)).bias is not None or getattr(b.attn, "q_bias", None) is not None)
    block_ids = {id(p) for b in blocks for p in b.parameters()}
    final_norm_ids = {id(p) for m in final_norm_modules(model) for p in m.parameters()}
    pre_norm_ids = {id(p) for m in pre_norm_modules(model) for p in m.parameters()}
    pool_ids = {id(p) for m in pool_modules(model) for p in m.parameters()}
    body = [(n, p) for n, p in model.named_parameters() if not is_head_param(n)]
    embed = sum(p.numel() for _, p in body if id(p) not in block_ids | final_norm_ids | pre_norm_ids | pool_ids)
    if family != "swin":
        grid = tuple(model.patch_embed.grid_size)
        prefix = int(model.num_prefix_tokens)
    else:
        grid = tuple(model.patch_embed.grid_size)
        prefix = 0
    head = model.get_classifier()
    in_features = head.in_features if isinstance(head, nn.Linear) else int(model.num_features)
    # the size the model was built for (an img_size given at creation), else the size it was pretrained at
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    input_size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    if built is not None:
        input_size = (input_size[0], int(built[0]), int(built[1]))
    return BackboneSpec(
        name=name,
        family=family,
        num_blocks=len(blocks),
        dims=tuple(dims),
        heads=tuple(heads),
        mlp_hidden=tuple(hidden),
        qkv_bias=tuple(qkv_bias),
        block_params=tuple(_numel(b) for b in blocks),
        bias_params=tuple(_numel(b, lambda n, p: n.endswith("bias")) for b in blocks),
        norm_params=tuple(sum(_numel(m) for m in b.modules() if is_norm(m)) for b in blocks),
        norm_bias_params=tuple(
            sum(_numel(m, lambda n, p: n.endswith("bias")) for m in b.modules() if is_norm(m)) for b in blocks
        ),
        num_patches=int(grid[0] * grid[1]),
        num_prefix_tokens=prefix,
        grid=(int(grid[0]), int(grid[1])),
        embed_params=int(embed),
        final_norm_params=sum(p.numel() for m in final_norm_modules(model) for p in m.parameters()),
        backbone_params=sum(p.numel() for _, p in body),
        head_in_features=int(in_features),
        input_size=(int(input_size[0]), int(input_size[1]), int(input_size[2])),
        no_bias=tuple(_no_bias(b) for b in blocks),
        embed_bias=getattr(getattr(model.patch_embed, "proj", None), "bias", None) is not None,
        pos_embed=isinstance(getattr(model, "pos_embed", None), nn.Parameter),
        final_norm_bias=all(getattr(m, "bias", None) is not None for m in final_norm_modules(model)),
        pre_norm_params=sum(p.numel() for m in pre_norm_modules(model) for p in m.parameters()),
        pool_params=sum(p.numel() for m in pool_modules(model) for p in m.parameters()),
        pool_norm_params=sum(_numel(n) for m in pool_modules(model) for n in m.modules() if is_norm(n)),
        fc1_outs=tuple(fc1_outs),
    )


def _no_bias(block: nn.Module) -> tuple[str, ...]:
    """Paths inside `block` of the modules with a weight and no bias (norms without one, bias-free linears)."""
    return tuple(sorted(n for n, m in block.named_modules()
                        if isinstance(getattr(m, "weight", None), nn.Parameter) and getattr(m, "bias", None) is None))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def _brief(exc: BaseException, limit: int = 200) -> str:
    """The informative part of an exception message on one line."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text[:limit] + ("…" if len(text) > limit else "")


def _offline_unless_hub_answers() -> None:
    """Switch the hub client to offline mode when the hub does not answer within 2 s.

    Otherwise a miss retries for ~47 s before failing; offline, cached weights still load and a miss fails at once.
    """
    if hub_offline():
        return
    from autopeft.data.base import network_answers

    if not network_answers("huggingface.co", 443, timeout=1.5):
        import huggingface_hub.constants

        os.environ["HF_HUB_OFFLINE"] = "1"
        huggingface_hub.constants.HF_HUB_OFFLINE = True


def check_pretrained(name: str, weights: str | Path | None = None) -> None:
    """Raise AutopeftError unless pretrained weights for `name` can come from somewhere (a file or timm's sources)."""
    if weights is not None:
        if not Path(weights).expanduser().is_file():
            raise AutopeftError(f"weights file '{weights}' does not exist; pass an existing file with --weights")
        return
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise AutopeftError(f"timm knows no pretrained weights for {name}; pass a weights file with --weights")


def create_backbone(
    name: str,
    num_classes: int = 1000,
    pretrained: bool = False,
    weights: str | Path | None = None,
    img_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a supported timm backbone, optionally with hub weights or a local weights file.

    Args:
        name: timm model name.
        num_classes: classes of the freshly initialised head.
        pretrained: load the pretrained weights timm knows for `name` (hub download unless cached).
        weights: a local weights file (safetensors, timm .npz, .pth/.bin read with weights_only); implies pretrained.
        img_size: input size in pixels (None: the pretraining size); timm resamples the position embeddings.
        kwargs: passed to `timm.create_model`.
    """
    _check_name(name)
    if img_size is not None:
        backbone_spec(name, img_size)  # a size the architecture cannot take fails here, in one line
        kwargs.update(size_kwargs(img_size))
    if weights is not None or pretrained:
        check_pretrained(name, weights)
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(Path(weights).expanduser()))
        pretrained = True
    elif pretrained:
        _offline_unless_hub_answers()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # torch's note on any .pth
            model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except Exception as exc:  # noqa: BLE001  hub misses, mismatched or junk files: each reader raises its own type
        if weights is not None and (isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc)):
            raise AutopeftError(
                f"weights file '{weights}' is a pickle holding more than tensors; it is read only with "
                "torch.load(weights_only=True), never run: save its state dict as safetensors and pass that"
            ) from exc
        if weights is not None:
            raise AutopeftError(f"could not load weights '{weights}' into {name}: {_brief(exc)}") from exc
        if pretrained:
            raise AutopeftError(
                f"pretrained weights for {name} could not be loaded ({_brief(exc)}); "
                "download them where the hub is reachable or pass a local file with --weights"
            ) from exc
        raise
    check_supported(model)
    return model


import autopeft.bundled  # noqa: E402,F401  (registers the bundled backbone)
