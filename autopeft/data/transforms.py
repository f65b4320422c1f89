"""Preprocessing from a backbone's timm pretrained config: PIL pipelines through timm.data, tensor ops for arrays.

Default (VTAB-style, as NOAH and the V-PEFT benchmark run it): squash-resize the whole image to the input size with
the backbone's interpolation, scale to [0, 1], normalise with the backbone's mean/std, no augmentation. With
`augment=True` the train splits get a mild random-resized crop (scale 0.5-1; image files) or a random shift of up
to 1/8 of the side (in-memory arrays), and, where the source allows it, a horizontal flip; evaluation splits never
do.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config
from timm.models import get_pretrained_cfg
from torch import nn

import autopeft.bundled  # noqa: F401  (registers the bundled backbone with timm, so its name resolves here too)
from autopeft.errors import AutopeftError

# PIL resampling names timm understands; the tensor path maps the ones F.interpolate lacks to bicubic.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
_TENSOR_MODES = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic"}

# Greyscale sources (digits, Fashion-MNIST) are shown as a centred 28-px glyph on a 32-px canvas, the format the
# bundled 32-px backbone is pretrained on (Fashion-MNIST padded by 2 px); other input sizes scale that canvas.
GLYPH_FRACTION = 28 / 32

# Random-resized-crop scale range when augmenting: few-shot splits (800 images) suffer from timm's ImageNet
# default (0.08-1), which often crops the object away.
AUGMENT_SCALE = (0.5, 1.0)


@dataclass(frozen=True)
class TransformSettings:
    """How every image of a dataset is turned into the model's input tensor."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    interpolation: str = "bicubic"
    augment: bool = False

    def __post_init__(self) -> None:
        size = tuple(int(v) for v in self.input_size)
        if len(size) != 3 or size[0] not in (1, 3) or min(size[1:]) < 1:
            raise AutopeftError(
                f"input_size {self.input_size} is invalid; give (channels, height, width), 1 or 3 channels"
            )
        mean, std = _per_channel(self.mean, size[0], "mean"), _per_channel(self.std, size[0], "std")
        if min(std) <= 0:
            raise AutopeftError(f"std {self.std} must be positive")
        if self.interpolation not in INTERPOLATIONS:
            raise AutopeftError(
                f"interpolation '{self.interpolation}' is unknown; use one of {', '.join(INTERPOLATIONS)}"
            )
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @property
    def hw(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[2]

    def to_dict(self) -> dict:
        return asdict(self)


def _per_channel(values: float | tuple[float, ...] | list[float], channels: int, what: str) -> tuple[float, ...]:
    vals = tuple(float(v) for v in (values if isinstance(values, (tuple, list)) else (values,)))
    if len(vals) == 1:
        vals = vals * channels
    if channels == 1 and len(vals) == 3:
        vals = (sum(vals) / 3,)  # an RGB statistic applied to a greyscale model: its channel average
    if len(vals) != channels:
        raise AutopeftError(f"{what} {values} has {len(vals)} values but the input has {channels} channels")
    return vals


def data_config(model_or_name: nn.Module | str, img_size: int | None = None) -> dict:
    """The input size, mean/std and interpolation a timm backbone was pretrained with.

    Args:
        model_or_name: a timm model (its `pretrained_cfg`, e.g. after loading local weights) or a timm model name.
        img_size: the input size the backbone runs at, when not its pretraining size (`--img-size`): images are
            resized to it, with the pretraining mean, std and interpolation.

    Returns:
        `{"input_size", "mean", "std", "interpolation"}`, ready to pass as keywords to `load_dataset`.
    """
    if isinstance(model_or_name, nn.Module):
        cfg = resolve_data_config(model=model_or_name)
    else:
        name = str(model_or_name)
        pretrained = get_pretrained_cfg(name) if timm.is_model(name) or "." in name else None
        if pretrained is None:
            if not timm.is_model(name):
                raise AutopeftError(f"unknown backbone '{name}'; any timm vit_*, deit_* or swin_* name works")
            with torch.device("meta"):  # architecture only: the config lives on the model, no weights needed
                cfg = resolve_data_config(model=timm.create_model(name, pretrained=False))
        else:
            cfg = resolve_data_config(pretrained_cfg=pretrained.to_dict())
    input_size = tuple(int(v) for v in cfg["input_size"])
    if img_size is not None:
        input_size = (input_size[0], int(img_size), int(img_size))
    return {
        "input_size": input_size,
        "mean": tuple(float(v) for v in cfg["mean"]),
        "std": tuple(float(v) for v in cfg["std"]),
        "interpolation": str(cfg["interpolation"]),
    }


def pil_transform(settings: TransformSettings, train: bool, hflip: bool = True) -> Callable:
    """A timm.data pipeline from a PIL image to a uint8 C×H×W tensor at the input size (normalised later).

    Evaluation (and non-augmented training) squashes the whole image to the input size (crop_pct 1, no crop), as
    VTAB does; augmented training uses timm's random-resized crop with `AUGMENT_SCALE` and no colour jitter.
    """
    common: dict[str, Any] = dict(
        input_size=settings.hw,
        interpolation=settings.interpolation,
        mean=settings.mean,
        std=settings.std,
        normalize=False,
    )
    if train and settings.augment:
        # color_jitter=None leaves ColorJitter out (0.0 would add an identity one that still draws random numbers);
        # timm types the argument without None but reads None as "off"
        no_jitter: Any = None
        return create_transform(
            is_training=True, scale=AUGMENT_SCALE, hflip=0.5 if hflip else 0.0, color_jitter=no_jitter, **common
        )
    return create_transform(is_training=False, crop_pct=1.0, crop_mode="squash", **common)


class Normalizer:
    """Turns uint8 [0, 255] or float [0, 1] images (… × C × H × W) into the model's normalised float input."""

    def __init__(self, settings: TransformSettings) -> None:
        self.channels = settings.channels
        self.mean = torch.tensor(settings.mean).view(-1, 1, 1)
        self.std = torch.tensor(settings.std).view(-1, 1, 1)
        self.zero = (0.0 - self.mean) / self.std  # where black (the canvas background) lands after normalising

    def on(self, device: torch.device | str) -> Normalizer:
        """This normaliser computing on `device` (the trainer normalises stored uint8 batches where it trains)."""
        out = copy.copy(self)
        out.mean, out.std, out.zero = self.mean.to(device), self.std.to(device), self.zero.to(device)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        x = match_channels(x, self.channels)
        return (x - self.mean) / self.std


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Replicate greyscale to RGB, or average RGB to grey, along dim -3."""
    have = x.shape[-3]
    if have == channels:
        return x
    if have == 1:
        return x.expand(*x.shape[:-3], channels, *x.shape[-2:])
    return x.mean(dim=-3, keepdim=True)


def resize_batch(x: torch.Tensor, size: tuple[int, int], interpolation: str, fraction: float = 1.0) -> torch.Tensor:
    """Resize float [0, 1] images N×C×h×w to `size`; with `fraction` < 1 the content is centred on a zero canvas.

    The content takes `round(fraction · size)` pixels per side and zero (black background) fills the rest, so at
    32 px a 28-px Fashion-MNIST image is padded by exactly 2 px and 8×8 digits are first upsampled to 28×28.
    """
    height, width = size
    inner = (max(1, round(height * fraction)), max(1, round(width * fraction)))
    if tuple(x.shape[-2:]) != inner:
        mode = _TENSOR_MODES.get(interpolation, "bicubic")
        kwargs = {} if mode == "nearest" else dict(align_corners=False, antialias=True)
        x = F.interpolate(x, size=inner, mode=mode, **kwargs).clamp_(0.0, 1.0)  # bicubic overshoots
    if inner == (height, width):
        return x
    top, left = (height - inner[0]) // 2, (width - inner[1]) // 2
    return F.pad(x, (left, width - inner[1] - left, top, height - inner[0] - top), value=0.0)


def augment_batch(x: torch.Tensor, hflip: bool, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Shift each image by up to 1/8 of its side (uncovered pixels get `fill`), then optionally flip it.

    A shift keeps the whole glyph in view, unlike a resized crop, which matters for 8×8 digits and other small
    centred sources; flips are off where they change the class (digits). `fill` is the background value (per
    channel, C×1×1) in the space of `x`. torch's global RNG draws the shifts, so a trainer that seeds torch (and
    its DataLoader workers) gets reproducible augmentation.
    """
    n, _, height, width = x.shape
    pad_h, pad_w = max(1, math.ceil(height / 8)), max(1, math.ceil(width / 8))
    dy = torch.randint(-pad_h, pad_h + 1, (n,)).tolist()
    dx = torch.randint(-pad_w, pad_w + 1, (n,)).tolist()
    out = torch.empty_like(x).copy_(torch.as_tensor(fill, dtype=x.dtype).expand_as(x))
    for i in range(n):
        h, w = height - abs(dy[i]), width - abs(dx[i])
        out[i, :, max(dy[i], 0) : max(dy[i], 0) + h, max(dx[i], 0) : max(dx[i], 0) + w] = x[
            i, :, max(-dy[i], 0) : max(-dy[i], 0) + h, max(-dx[i], 0) : max(-dx[i], 0) + w
        ]
    if hflip:
        flip = torch.rand(n) < 0.5
        out[flip] = out[flip].flip(-1)
    return out
