"""The two Dataset kinds every reader builds on (image files, in-memory arrays) and the stratified seeded split."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from autopeft.data import pixels
from autopeft.data.transforms import Normalizer, TransformSettings, augment_batch, pil_transform, resize_batch
from autopeft.defaults import env_megabytes
from autopeft.errors import AutopeftError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def cache_budget() -> int:
    """Bytes a split may keep of preprocessed images in memory ($AUTOPEFT_DATA_CACHE_MB, default 256)."""
    return env_megabytes("AUTOPEFT_DATA_CACHE_MB", 256)


class PixelCache:
    """Files' decoded and resized images (uint8, before normalisation), shared by every dataset of the process.

    A search worker runs trial after trial (Ray reuses it) and each trial loads the dataset anew: the next trial
    finds the images the previous one decoded. Entries are keyed by the file (path, size, modification time: read
    once per file by each dataset) and the preprocessing, so a file changed since or another input size misses.
    Filled first come, first kept, up to $AUTOPEFT_IMAGE_CACHE_MB (default 1024) per process; 0 turns it off.
    """

    def __init__(self) -> None:
        self._items: dict[tuple, torch.Tensor] = {}
        self.bytes = 0

    @staticmethod
    def limit() -> int:
        return env_megabytes("AUTOPEFT_IMAGE_CACHE_MB", 1024)

    @staticmethod
    def key(path: str, preprocessing: tuple) -> tuple | None:
        try:
            st = os.stat(path)
        except OSError:
            return None  # read_image says what is wrong with it
        return (path, st.st_size, st.st_mtime_ns, *preprocessing)

    def get(self, key: tuple | None) -> torch.Tensor | None:
        return None if key is None else self._items.get(key)

    def put(self, key: tuple | None, pixels: torch.Tensor) -> None:
        size = pixels.numel() * pixels.element_size()
        if key is not None and key not in self._items and self.bytes + size <= self.limit():
            self._items[key] = pixels
            self.bytes += size

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


PIXELS = PixelCache()
DECODED = 0  # image files this process has decoded at full size (read by tests: a stored split decodes none)


def read_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Decode an image fully (so truncation shows now, not mid-batch) and convert it to `mode`."""
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except FileNotFoundError:
        raise AutopeftError(f"image {path} is missing; restore it or remove it from the split list") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise AutopeftError(f"image {path} is unreadable or truncated ({exc}); replace or delete it") from exc


class ImageFileDataset(Dataset):
    """Images read from files with a timm.data pipeline, yielding (normalised C×H×W float tensor, label).

    Without augmentation the split's images are decoded and resized once per node into the pixel store
    (`autopeft.data.pixels`) and read from there, memory-mapped; `pixel_batch` gives a batch as uint8 for the
    trainer to normalise on its device. Where the store is off (or the split exceeds it) each image is decoded as it
    is read and kept in the process's `PIXELS` cache. Augmented splits decode every image as it is read (the random
    crop is taken from the full-resolution image).
    """

    def __init__(
        self, samples: Sequence[tuple[str, int]], settings: TransformSettings, train: bool = False, hflip: bool = True
    ) -> None:
        self.samples = [(str(p), int(y)) for p, y in samples]
        self.settings, self.hflip = settings, hflip
        self.augment = bool(train and settings.augment)
        self.transform = pil_transform(settings, train=train, hflip=hflip)
        self.normalize = Normalizer(settings)
        self._mode = "RGB" if settings.channels == 3 else "L"
        self._preprocessing = (settings.input_size, settings.interpolation, self._mode, bool(train), bool(hflip))
        self._keys: dict[int, tuple] = {}  # index -> PIXELS key: a file is stat-ed once, not once per epoch
        self._store: np.ndarray | None = None
        self._store_tried = False

    @property
    def targets(self) -> list[int]:
        return [y for _, y in self.samples]

    def as_eval(self) -> ImageFileDataset:
        """The same files read as an evaluation split (no augmentation)."""
        return ImageFileDataset(self.samples, self.settings, train=False, hflip=self.hflip)

    def __getstate__(self) -> dict:
        # a spawned worker maps the store itself; pickling the mapping would copy every image
        return dict(self.__dict__, _store=None, _store_tried=False)

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, path: str) -> torch.Tensor:
        global DECODED
        DECODED += 1
        pixels = self.transform(read_image(path, self._mode))
        return pixels.unsqueeze(0) if pixels.ndim == 2 else pixels  # MaybePILToTensor drops a greyscale channel axis

    def stored(self) -> np.ndarray | None:
        """The split's uint8 pixels from the node's pixel store (decoded into it on first use); None when the split
        is augmented or not stored (see `autopeft.data.pixels.stored`)."""
        if not self._store_tried and not self.augment:
            self._store_tried = True
            self._store = pixels.stored([p for p, _ in self.samples], self.settings.input_size,
                                        self.settings.interpolation, self._mode,
                                        lambda path: self._decode(path).numpy(), threads=torch.get_num_threads())
        return self._store

    def pixel_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """uint8 images (B×C×H×W, not normalised) and labels of `indices` from the pixel store; None where the split
        is not stored (then read items)."""
        store = self.stored()
        if store is None:
            return None
        return (torch.from_numpy(store[np.asarray(indices, dtype=np.int64)]),
                torch.tensor([self.samples[i][1] for i in indices], dtype=torch.long))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        store = self.stored()
        if store is not None:
            return self.normalize(torch.from_numpy(store[index])), label
        key = None if self.augment else self._keys.get(index)
        if key is None and not self.augment:
            key = PIXELS.key(path, self._preprocessing)
            if key is not None:
                self._keys[index] = key
        cached = PIXELS.get(key)
        if cached is None:
            cached = self._decode(path)
            PIXELS.put(key, cached)
        return self.normalize(cached), label

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        batch = self.pixel_batch(indices)
        if batch is None:
            return [self[i] for i in indices]
        x, y = batch
        return list(zip(self.normalize(x).unbind(0), y.tolist(), strict=True))


class TensorImageDataset(Dataset):
    """In-memory images (N×c×h×w, uint8 0-255 or float 0-1) preprocessed in vectorised batches.

    The model-ready images of the whole split are computed once, on first access, when they fit in
    `cache_budget()` (then a batch is one indexing op, plus the shift/flip when augmenting); otherwise each batch
    is resized and normalised on the fly. `__getitems__` lets a DataLoader fetch a whole
    batch in one vectorised call.

    Args:
        images: source images; greyscale ones have c = 1 and are replicated to the model's channels.
        labels: integer class labels, one per image.
        settings: input size, mean/std, interpolation, augment flag.
        train: whether this is a training split (augmented when `settings.augment`).
        fraction: side of the content relative to the input (< 1 centres it on a zero canvas).
        hflip: whether augmentation may flip horizontally.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | Sequence[int],
        settings: TransformSettings,
        train: bool = False,
        fraction: float = 1.0,
        hflip: bool = False,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"expected N×C×H×W images, got shape {tuple(images.shape)}")
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        if len(self.labels) != len(images):
            raise ValueError("images and labels differ in length")
        self.settings = settings
        self.augment = bool(train and settings.augment)
        self.fraction = fraction
        self.hflip = hflip
        self.normalize = Normalizer(settings)
        self._prepared: torch.Tensor | None = None

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def as_eval(self) -> TensorImageDataset:
        """The same images read as an evaluation split (no augmentation)."""
        out = copy.copy(self)
        out.augment = False
        return out

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _prepared=None)  # the cache is rebuilt where it is used, not shipped

    def __len__(self) -> int:
        return len(self.labels)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        return self.normalize(resize_batch(x, self.settings.hw, self.settings.interpolation, self.fraction))

    def _prepared_at(self, index: torch.Tensor) -> torch.Tensor:
        if self._prepared is None:
            if len(self) * self.normalize.channels * self.settings.hw[0] * self.settings.hw[1] * 4 > cache_budget():
                return self._prepare(self.images[index])
            # Built in chunks so the float copy of a large source never exists whole next to the result.
            chunks = [self._prepare(self.images[i : i + 1024]) for i in range(0, len(self), 1024)]
            self._prepared = torch.cat(chunks).contiguous() if chunks else self._prepare(self.images)
        return self._prepared[index]

    def batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (normalised, B×C×H×W) and labels (B) of `indices`, in one vectorised pass."""
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        x = self._prepared_at(index)
        if self.augment:
            x = augment_batch(x, hflip=self.hflip, fill=self.normalize.zero)
        return x, self.labels[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.batch([index])
        return x[0], int(y[0])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        x, y = self.batch(indices)
        return list(zip(x.unbind(0), y.tolist(), strict=True))


def stratified_split(labels: Sequence[int] | np.ndarray, counts: Sequence[int], seed: int) -> list[np.ndarray]:
    """Split indices into parts of exactly `counts` images each, plus the rest, class-balanced and seeded.

    Each part takes every class in proportion to what is left of it (largest remainder, ties broken by the seeded
    generator), so per-class counts differ from the exact proportion by less than one image.

    Returns:
        `len(counts) + 1` sorted index arrays: one per count, then the remaining indices.
    """
    labels = np.asarray(labels)
    if sum(counts) > len(labels) or min(counts, default=0) < 0:
        raise AutopeftError(f"cannot split {len(labels)} images into parts of {list(counts)}; add images")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    parts: list[np.ndarray] = []
    for count in counts:
        left = np.array([len(pools[c]) for c in classes], dtype=float)
        quota = count * left / max(left.sum(), 1)
        take = np.floor(quota).astype(int)
        short = count - int(take.sum())
        order = sorted(range(len(classes)), key=lambda k: (-(quota[k] - take[k]), rng.random()))
        for k in [k for k in order if take[k] < left[k]][:short]:
            take[k] += 1
        chosen: list[int] = []
        for k, c in enumerate(classes):
            chosen += pools[c][: take[k]]
            pools[c] = pools[c][take[k] :]
        parts.append(np.sort(np.array(chosen, dtype=int)))
    parts.append(np.sort(np.array([i for c in classes for i in pools[c]], dtype=int)))
    return parts


def check_images(data: Any, splits: Sequence[str | None] = ("train", "val"), workers: int = 4) -> None:
    """Decode every image file of `data`'s `splits` once (a search's train and val; a training run's splits and
    test), so a truncated or unreadable file fails before anything trains, as one line, rather than every trial or
    a run mid-way. JPEGs decode at 1/8 scale: every byte is still read."""
    from concurrent.futures import ThreadPoolExecutor

    paths = sorted({str(p) for name in splits if name for p, _ in getattr(data.split(name), "samples", [])})

    def decode(path: str) -> str | None:
        try:
            with Image.open(path) as img:
                img.draft(img.mode if img.mode in ("RGB", "L") else "RGB", (32, 32))
                img.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            return f"image {path} is unreadable or truncated ({exc}); replace or delete it"
        return None

    with ThreadPoolExecutor(workers) as pool:
        for problem in pool.map(decode, paths):
            if problem:
                pool.shutdown(wait=False, cancel_futures=True)
                raise AutopeftError(problem)
