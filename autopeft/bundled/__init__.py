"""The bundled tiny backbone: a small timm ViT pretrained on Fashion-MNIST, shipped with the package.

`timm.create_model("autopeft_tiny_vit", pretrained=True, num_classes=K)` loads the bundled safetensors offline and,
when K differs from the 10 Fashion-MNIST classes, gives a freshly initialised head (timm drops the pretrained one).
The weights come from `python -m autopeft.bundled.pretrain` (see that module); `bundled_info()` returns what it
recorded (architecture, test accuracy, epochs, seed, date, command).

Images are 28 px grey items padded with 2 px of background on each side to 32 px and replicated to 3 channels, so
target tasks (digits, RGB images) are presented the same way: centred in 32 px, normalised with MEAN/STD below.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from autopeft.defaults import BUNDLED_BACKBONE

_HERE = Path(__file__).resolve().parent
WEIGHTS_FILE = _HERE / f"{BUNDLED_BACKBONE}.safetensors"
INFO_FILE = _HERE / f"{BUNDLED_BACKBONE}.json"

# Sized so that one epoch of an 800-image PEFT search trial (frozen backbone, batch 32) takes about 1 s on 2 CPU
# cores; mlp_ratio 2 buys depth 6 for the price of ~depth 4 at ratio 4 (more blocks to place PEFT modules in).
ARCH: dict[str, Any] = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.0)

# Fashion-MNIST pixel statistics of the 60k training images after the 28 -> 32 px zero pad (values in [0, 1]),
# the same for the three replicated channels.
PAD = 2
MEAN = (0.2190, 0.2190, 0.2190)
STD = (0.3318, 0.3318, 0.3318)
NUM_CLASSES = 10
# pretrain.py trains without stochastic depth: fine-tuning turns drop-path off for it (autopeft.train.fitted_config)
PRETRAINED_DROP_PATH = 0.0

# timm's register_model reads the pretrained configs of a module from its `default_cfgs`.
default_cfgs = generate_default_cfgs(
    {
        BUNDLED_BACKBONE: dict(
            file=str(WEIGHTS_FILE),
            input_size=(3, 32, 32),
            num_classes=NUM_CLASSES,
            mean=MEAN,
            std=STD,
            # crop_pct 1.0: the image is used whole, no centre crop (the pad already frames it).
            interpolation="bicubic",
            crop_pct=1.0,
            first_conv="patch_embed.proj",
            classifier="head",
            license="apache-2.0",
        )
    }
)


@register_model
def autopeft_tiny_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Depth-6, dim-96 ViT at 32 px, patch 4, pretrained on Fashion-MNIST (weights bundled in the package).

    Keyword arguments override the architecture (e.g. `num_classes`, `img_size`); timm's ViT checkpoint filter
    resamples the position embeddings when `img_size` differs from 32.
    """
    return build_model_with_cfg(
        VisionTransformer,
        BUNDLED_BACKBONE,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **dict(ARCH, **kwargs),
    )


def bundled_info() -> dict[str, Any]:
    """The metadata recorded by the pretraining run next to the bundled weights.

    Returns:
        The parsed JSON: architecture, test accuracy, epochs, seed, date, command, versions.

    Raises:
        FileNotFoundError: if the package was installed without its data files.
    """
    return json.loads(INFO_FILE.read_text())


__all__ = ["ARCH", "BUNDLED_BACKBONE", "INFO_FILE", "MEAN", "STD", "WEIGHTS_FILE", "bundled_info"]
