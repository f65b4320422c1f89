"""Using a finished run: rebuild its model (backbone + adapter, or the merged weights), evaluate it, predict images.

The model is rebuilt exactly as training built it (autopeft.train.build_model + load_adapter, or a plain timm model
with merged.safetensors), and data go through the same autopeft.data preprocessing, so `evaluate` reproduces the
accuracy the run recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from autopeft.backbones import create_backbone
from autopeft.errors import AutopeftError
from autopeft.plan import load_adapter
from autopeft.recipe import load_data
from autopeft.runs import Run
from autopeft.train import autocast, build_model, evaluate, num_samples, on_device, resolve_device


def num_classes_of(run: Run) -> int:
    return int(run.recipe.num_classes or run.metrics["num_classes"])


def plain_model(backbone: str, num_classes: int, state: dict[str, torch.Tensor], source: str = "state dict",
                img_size: int | None = None) -> nn.Module:
    """A plain timm model (no autopeft wrappers) at input size `img_size` holding `state`."""
    model = create_backbone(backbone, num_classes=num_classes, img_size=img_size)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:200]
        raise AutopeftError(f"{source} does not fit {backbone} with {num_classes} classes: {first}") from None
    return model.eval()


def load_model(run: Run, merged: bool = False, weights: str | None = None) -> nn.Module:
    """The run's trained model, in eval mode on the CPU.

    Args:
        run: the run directory, read by autopeft.runs.load_run.
        merged: load merged.safetensors into a plain timm model instead of backbone + adapter.
        weights: the backbone's weights file when it moved since training (the recipe's otherwise).
    """
    k = num_classes_of(run)
    if merged:
        if not run.merged.is_file():
            raise AutopeftError(f"run '{run.path}' has no merged.safetensors; train it with --merge (a plan of "
                                "mergeable methods only), or evaluate the adapter without --merged")
        try:
            state = load_file(str(run.merged))
        except Exception as exc:  # noqa: BLE001  a damaged or foreign file; safetensors raises its own error types
            raise AutopeftError(f"{run.merged} is not a readable safetensors file "
                                f"({' '.join(str(exc).split())[:160]}); train the run again with --merge") from None
        return plain_model(run.recipe.backbone, k, state, str(run.merged), run.recipe.img_size)
    model, _ = build_model(run.recipe.backbone, run.recipe.plan, k, weights or run.recipe.weights,
                           img_size=run.recipe.img_size)
    load_adapter(model, run.adapter)
    return model.eval()


def recorded_accuracy(run: Run, split: str, merged: bool) -> float | None:
    """The accuracy the run recorded on `split` (None when it measured none there)."""
    if split == "test":
        return (run.metrics.get("merged") or {}).get("test_acc") if merged else run.metrics.get("test_acc")
    if split == "val" and run.recipe.protocol == "search":
        return run.metrics.get("val_acc")
    return None


def run_precision(run: Run, device: torch.device) -> str:
    """The precision the run computed at (its metrics say; runs from before they did: bf16 on a GPU, else fp32)."""
    recorded = run.metrics.get("precision")
    if recorded:
        return str(recorded)
    return "bf16" if device.type == "cuda" else "fp32"


def evaluate_run(run: Run, split: str = "test", merged: bool = False, data_root: str | None = None,
                 weights: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Accuracy and loss of the run's model on `split` at the run's precision, next to what the run recorded."""
    data = load_data(run.recipe, data_root)
    dataset = data.split(split)
    dev = resolve_device(device)
    model = on_device(load_model(run, merged, weights), dev)
    batch = int((run.metrics.get("config") or {}).get("eval_batch_size", 256))  # as training evaluated
    precision = run_precision(run, dev)
    loss, acc = evaluate(model, dataset, batch, dev, precision=precision)
    recorded = recorded_accuracy(run, split, merged)
    return {"run": str(run.path), "split": split, "model": "merged" if merged else "adapter",
            "images": num_samples(dataset), "acc": acc, "loss": loss, "recorded_acc": recorded,
            "precision": precision, "matches": recorded is None or acc == recorded}


def image_preprocessor(dataset: Dataset) -> Callable[[str | Path], torch.Tensor]:
    """A function from an image file to the model input, exactly as `dataset` prepares its own images."""
    from autopeft.data.datasets import ImageFileDataset, TensorImageDataset, read_image
    from autopeft.data.transforms import resize_batch

    if isinstance(dataset, ImageFileDataset):
        mode = "RGB" if dataset.settings.channels == 3 else "L"

        def from_file(path: str | Path) -> torch.Tensor:
            pixels = dataset.transform(read_image(path, mode))
            return dataset.normalize(pixels.unsqueeze(0) if pixels.ndim == 2 else pixels)

        return from_file
    if isinstance(dataset, TensorImageDataset):
        mode = "L" if dataset.images.shape[1] == 1 else "RGB"  # the source's own channels, as the arrays hold them
        s = dataset.settings

        def from_array(path: str | Path) -> torch.Tensor:
            x = torch.from_numpy(np.asarray(read_image(path, mode), dtype=np.float32) / 255.0)
            x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
            return dataset.normalize(resize_batch(x.unsqueeze(0), s.hw, s.interpolation, dataset.fraction))[0]

        return from_array
    raise AutopeftError(f"predict cannot prepare images like a {type(dataset).__name__}; evaluate the run instead")


@torch.no_grad()
def predict(run: Run, images: Sequence[str | Path], top_k: int = 5, merged: bool = False,
            data_root: str | None = None, weights: str | None = None, device: str = "auto") -> list[dict[str, Any]]:
    """Top-k classes of each image: [{image, top: [{index, name, prob}]}], preprocessed like the test split."""
    if top_k < 1:
        raise AutopeftError(f"--top-k must be >= 1, got {top_k}")
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise AutopeftError(f"image file(s) not found: {', '.join(missing[:3])}")
    data = load_data(run.recipe, data_root)
    prepare = image_preprocessor(data.test)
    batch = torch.stack([prepare(p) for p in images])
    dev = resolve_device(device)
    model = on_device(load_model(run, merged, weights), dev)
    with autocast(run_precision(run, dev), dev):
        probs = model(batch.to(dev)).float().softmax(-1).cpu()
    values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    names = data.class_names
    return [{"image": str(path),
             "top": [{"index": int(i), "name": names[int(i)] if names else str(int(i)), "prob": float(v)}
                     for v, i in zip(vals.tolist(), idx.tolist(), strict=True)]}
            for path, vals, idx in zip(images, values, indices, strict=True)]
