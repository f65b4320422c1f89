"""Frozen-prefix feature cache.

When a plan leaves the patch embedding and blocks 0..k-1 exactly as pretrained and the inputs are not augmented, the
output of block k-1 is the same every epoch: compute it once per split and train only blocks k.. and the head.
Entries are keyed by the prefix's weights (a hash of the tensors), k, the dataset fingerprint (name, root, seed,
transform) and the split; they live as safetensors files under the cache directory, written atomically, and the
directory is bounded in size (least recently used entries go first).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autopeft.backbones import family_of
from autopeft.defaults import env_megabytes

FORMAT = 2  # 2: keyed by the run's precision, features stored in the dtype the prefix computed them in


def default_cache_dir() -> Path:
    env = os.environ.get("AUTOPEFT_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "autopeft" / "features"


def max_cache_bytes() -> int:
    return env_megabytes("AUTOPEFT_CACHE_MB", 4096)


def prefix_modules(model: nn.Module, k: int) -> list[nn.Module]:
    """The modules that compute the input of block k in a timm ViT (embedding, pre-norm and blocks 0..k-1)."""
    vit: Any = model
    mods = [vit.patch_embed, vit.pos_drop, vit.patch_drop, vit.norm_pre]
    return mods + list(vit.blocks[:k])


def supports_cache(model: nn.Module) -> bool:
    return family_of(model) == "vit"


@torch.no_grad()
def prefix_forward(module: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    model: Any = module
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    for block in model.blocks[:k]:
        x = block(x)
    return x


def suffix_forward(module: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """Logits from the block-k input: the rest of `VisionTransformer.forward`."""
    model: Any = module
    for block in model.blocks[k:]:
        x = block(x)
    x = model.norm(x)
    return model.forward_head(x)


def weights_hash(model: nn.Module, k: int) -> str:
    """A hash of every tensor the prefix computes with (parameters and buffers, the position embedding included)."""
    h = hashlib.blake2b(digest_size=16)
    tensors = [("cls_token", getattr(model, "cls_token", None)), ("reg_token", getattr(model, "reg_token", None)),
               ("pos_embed", getattr(model, "pos_embed", None))]
    for i, mod in enumerate(prefix_modules(model, k)):
        tensors += [(f"{i}.{n}", t) for n, t in mod.state_dict().items()]
    for name, t in tensors:
        if t is None:
            continue
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """Block-k input features of one split, computed once and kept on disk."""

    def __init__(self, directory: str | Path | None = None, max_bytes: int | None = None):
        self.directory = Path(directory) if directory else default_cache_dir()
        self.max_bytes = max_cache_bytes() if max_bytes is None else max_bytes

    def key(self, model_name: str, weights: str, k: int, fingerprint: str, split: str, precision: str = "fp32"
            ) -> str:
        identity = dict(f=FORMAT, model=model_name, weights=weights, k=k, data=fingerprint, split=split,
                        precision=precision)
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]

    def features(self, model: nn.Module, k: int, dataset: Dataset, key: str, batch_size: int = 256,
                 device: torch.device | str = "cpu",
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, labels) of `dataset` at the input of block k, from the cache or computed and stored.

        `autocast()` is the run's precision (`autopeft.train.autocast`): the prefix computes under it exactly as the
        uncached model's prefix does, and the features keep the dtype it gives them, so cached and uncached runs
        feed the same values to block k."""
        path = self.directory / f"{key}.safetensors"
        if path.is_file():
            try:
                data = load_file(str(path))
                os.utime(path)  # recently used: evicted last
                return data["x"], data["y"]
            except Exception:  # noqa: BLE001  a torn or foreign file is recomputed, never trusted
                path.unlink(missing_ok=True)
        xs, ys = [], []
        was_training = model.training
        model.eval()
        for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            with autocast():
                xs.append(prefix_forward(model, images.to(device), k).cpu())
            ys.append(torch.as_tensor(labels))
        model.train(was_training)
        x, y = torch.cat(xs), torch.cat(ys).long()
        self._store(path, x, y)
        return x, y

    def _store(self, path: Path, x: torch.Tensor, y: torch.Tensor) -> None:
        size = x.numel() * x.element_size()
        if size > self.max_bytes:
            return  # larger than the whole cache: use it in memory only
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"x": x.contiguous(), "y": y.contiguous()}, tmp)
            os.replace(tmp, path)  # atomic: concurrent trials never read a half-written entry
        finally:
            Path(tmp).unlink(missing_ok=True)
        self.evict()

    def evict(self) -> None:
        """Remove least recently used entries until the directory fits `max_bytes`."""
        entries = sorted(self.directory.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        for p in entries:
            if total <= self.max_bytes:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)
