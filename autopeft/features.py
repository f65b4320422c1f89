"""Frozen-prefix feature cache.

When a plan leaves the patch embedding and blocks 0..k-1 exactly as pretrained and the inputs are not augmented, the
output of block k-1 is the same every epoch: compute it once per split and train only blocks k.. and the head.
Entries are keyed by the prefix's weights (a hash of the tensors), k, the dataset fingerprint (name, root, seed,
transform), the split and the run's precision; they live as safetensors files under the cache directory (one per
node: `$AUTOPEFT_CACHE`), written batch by batch and published atomically, memory-mapped when read, one writer per
entry (a lock file), and the directory is bounded in size (least recently used entries go first).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autopeft.backbones import family_of
from autopeft.defaults import env_megabytes
from autopeft.eva import rope_embed
from autopeft.filelock import locked

FORMAT = 2  # 2: keyed by the run's precision, features stored in the dtype the prefix computed them in


def default_cache_dir() -> Path:
    env = os.environ.get("AUTOPEFT_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "autopeft" / "features"


def max_cache_bytes() -> int:
    return env_megabytes("AUTOPEFT_CACHE_MB", 4096)


def prefix_modules(model: nn.Module, k: int) -> list[nn.Module]:
    """The modules that compute the input of block k in a timm ViT or Eva (embedding, pre-norm, the rotary
    embedding where there is one, blocks 0..k-1)."""
    vit: Any = model
    mods = [vit.patch_embed, vit.pos_drop, vit.patch_drop, vit.norm_pre, getattr(vit, "rope", None)]
    return [m for m in mods if m is not None] + list(vit.blocks[:k])


def supports_cache(model: nn.Module) -> bool:
    """A ViT or an Eva whose rotary embedding is the same every forward (no train-time coordinate augmentation)."""
    return family_of(model) in ("vit", "eva") and not getattr(getattr(model, "rope", None), "aug_active", False)


def _block_kwargs(model: nn.Module, rope: Any = None) -> list[dict[str, Any]]:
    """The keywords each block is called with: Eva's rotary embedding (`rope`, or the one the model builds at its
    input size; one per block for a mixed rope), none for a ViT."""
    m: Any = model
    if family_of(model) != "eva":
        return [{} for _ in m.blocks]
    rope = rope_embed(model) if rope is None else rope
    if getattr(m, "rope_mixed", False) and rope is not None:
        return [{"rope": rope[i]} for i in range(len(m.blocks))]
    return [{"rope": rope} for _ in m.blocks]


@torch.no_grad()
def prefix_forward(module: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    model: Any = module
    x = model.patch_embed(x)
    rope = None
    if family_of(model) == "eva":  # Eva's _pos_embed drops patches itself and hands back the rotary embedding
        x, rope = model._pos_embed(x)
    else:
        x = model._pos_embed(x)
        x = model.patch_drop(x)
    x = model.norm_pre(x)
    for block, kwargs in zip(model.blocks[:k], _block_kwargs(model, rope), strict=False):
        x = block(x, **kwargs)
    return x


def suffix_forward(module: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """Logits from the block-k input: the rest of `VisionTransformer.forward` (or `Eva.forward`)."""
    model: Any = module
    for block, kwargs in zip(model.blocks[k:], _block_kwargs(model)[k:], strict=True):
        x = block(x, **kwargs)
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


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def _header(tensors: dict[str, tuple[torch.dtype, list[int], int]]) -> bytes:
    """A safetensors header for tensors laid out in this order: {name: (dtype, shape, bytes)}."""
    meta, offset = {}, 0
    for name, (dtype, shape, nbytes) in tensors.items():
        meta[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor (any dtype: bf16 has no numpy type)."""
    return t.reshape(-1).view(torch.uint8).numpy().data


def _mapped(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (x, y) of a cache file, memory-mapped; None when it is missing, torn or foreign (a torn or foreign file is
    deleted: recomputed, never trusted)."""
    names = {v: k for k, v in _DTYPES.items()}
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            meta = json.loads(f.read(length))
            start = 8 + length
            end = max(int(m["data_offsets"][1]) for m in meta.values())
            if os.fstat(f.fileno()).st_size != start + end:
                raise ValueError("size does not match the header")
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: a trial never writes the file
        out = []
        for name in ("x", "y"):
            m = meta[name]
            dtype, shape, (a, b) = names[m["dtype"]], m["shape"], m["data_offsets"]
            count = (b - a) // torch.empty((), dtype=dtype).element_size()
            tensor = torch.frombuffer(mapping, dtype=dtype, count=count, offset=start + a) if count else \
                torch.empty(0, dtype=dtype)
            out.append(tensor.view(shape))
        os.utime(path)  # recently used: evicted last
        return out[0], out[1]
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001  a torn or foreign file
        path.unlink(missing_ok=True)
        return None


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
        feed the same values to block k. The features are memory-mapped from their file, not loaded: concurrent
        trials of a node share its pages, and a split larger than memory still trains. One process computes an
        entry while the others that want it wait for it (a lock file per entry)."""
        path = self.directory / f"{key}.safetensors"
        found = _mapped(path)
        if found is not None:
            return found
        self.directory.mkdir(parents=True, exist_ok=True)
        with locked(self.directory / f"{key}.lock"):
            found = _mapped(path)  # written by another process while this one waited
            if found is not None:
                return found
            return self._compute(path, model, k, dataset, batch_size, device, autocast)

    def _compute(self, path: Path, model: nn.Module, k: int, dataset: Dataset, batch_size: int,
                 device: torch.device | str, autocast: Callable[[], contextlib.AbstractContextManager]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the entry batch by batch straight into a file (never the whole split in memory, let alone twice),
        then publish it atomically; an entry larger than the whole cache is mapped from a file deleted at once."""
        n = len(dataset)  # type: ignore[arg-type]  # every dataset here has a length
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        was_training = model.training
        model.eval()
        try:
            with os.fdopen(fd, "wb") as f:
                labels: list[torch.Tensor] = []
                size = 0
                for images, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                    with autocast():
                        x = prefix_forward(model, images.to(device), k).cpu().contiguous()
                    if not labels:
                        size = n * x[0].numel() * x.element_size()
                        f.write(_header({"x": (x.dtype, [n, *x.shape[1:]], size), "y": (torch.int64, [n], n * 8)}))
                    f.write(_raw(x))
                    labels.append(torch.as_tensor(y).long())
                f.write(_raw(torch.cat(labels)))
            if size > self.max_bytes:  # larger than the whole cache: mapped for this run only
                found = _mapped(Path(tmp))
                Path(tmp).unlink(missing_ok=True)  # the mapping keeps the pages until the run drops them
            else:
                os.replace(tmp, path)  # atomic: a reader never maps a half-written entry
                self.evict()
                found = _mapped(path)
        finally:
            model.train(was_training)
            Path(tmp).unlink(missing_ok=True)
        if found is None:
            raise RuntimeError(f"the feature cache entry {path.name} could not be read back")
        return found

    def evict(self) -> None:
        """Remove least recently used entries until the directory fits `max_bytes`."""
        entries = sorted(self.directory.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        for p in entries:
            if total <= self.max_bytes:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)
