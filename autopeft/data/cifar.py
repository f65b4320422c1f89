"""CIFAR-10 / CIFAR-100 in torchvision's layout (the python pickle batches), on the VTAB-1k-like protocol.

800 train / 200 val drawn stratified and seeded from the 50,000 train images, test = the official 10,000; the
32×32 images are resized to fill the input (natural images, no canvas) and may be flipped when augmenting.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autopeft.data.arrays import vtab_like_splits
from autopeft.data.base import DataSplits, Request, register_dataset
from autopeft.errors import AutopeftError

HOST = "www.cs.toronto.edu"  # where torchvision's CIFAR archives come from


@dataclass(frozen=True)
class CifarLayout:
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str
    names_key: str
    num_classes: int
    torchvision_class: str


LAYOUTS = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
        10,
        "CIFAR10",
    ),
    "cifar100": CifarLayout(
        "cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names", 100, "CIFAR100"
    ),
}


# What CIFAR's python batches hold besides plain containers: numpy arrays, dtypes and scalars (numpy 1 and 2 names).
_ALLOWED = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
            for name in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype")}


class _DataOnly(pickle.Unpickler):
    """An unpickler that builds containers, strings, numbers and numpy arrays, and refuses every other global: a
    pickle naming a function (`os.system`, a class with a `__reduce__`) fails before anything runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which no CIFAR batch holds (refused, not run)")


def _unpickle(path: Path) -> dict:
    # The batches are pickles by design of the format; they are read with an unpickler that admits data only.
    try:
        with open(path, "rb") as f:
            return _DataOnly(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, AttributeError, ImportError) as exc:
        raise AutopeftError(f"{path} is unreadable or not a CIFAR batch ({exc}); replace it with the original") from exc


def _batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    entry = _unpickle(path)
    if not isinstance(entry, dict) or "data" not in entry or layout.label_key not in entry:
        raise AutopeftError(f"{path} lacks 'data' or '{layout.label_key}'; replace it with the original CIFAR file")
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(entry[layout.label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise AutopeftError(f"{path} holds data of shape {data.shape} for {len(labels)} labels; replace it")
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise AutopeftError(f"{path} has labels outside 0-{layout.num_classes - 1}; replace it")
    return data.reshape(-1, 3, 32, 32), labels


def _complete(folder: Path, layout: CifarLayout) -> bool:
    return all((folder / name).is_file() for name in (*layout.train, layout.test))


def load_cifar(key: str, req: Request) -> DataSplits:
    """CIFAR-10 or CIFAR-100 from `ROOT/cifar-10-batches-py` / `ROOT/cifar-100-python`."""
    layout = LAYOUTS[key]
    folder = req.root / layout.folder
    if not _complete(folder, layout) and req.may_download(HOST):
        import torchvision

        try:
            getattr(torchvision.datasets, layout.torchvision_class)(str(req.root), train=True, download=True)
        except Exception as exc:  # any failure of the download means the same to the user
            raise AutopeftError(f"downloading {key} into {folder} failed ({exc})") from exc
    if not _complete(folder, layout):
        raise AutopeftError(
            f"{key} not found under {folder}: put {', '.join((*layout.train, layout.test, layout.meta))} there "
            "(torchvision's layout), or run with network access to download"
        )
    parts = [_batch(folder / name, layout) for name in layout.train]
    images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test = _batch(folder / layout.test, layout)
    meta = _unpickle(folder / layout.meta) if (folder / layout.meta).is_file() else {}
    names = [str(n) for n in meta.get(layout.names_key, [])] if isinstance(meta, dict) else []
    if len(names) != layout.num_classes:
        names = []  # a missing or foreign meta file: labels stay usable, names are only for reports
    return vtab_like_splits(req, images, labels, layout.num_classes, names or None, test=test, hflip=True)


for _key in LAYOUTS:
    register_dataset(_key, small_images=True)(functools.partial(load_cifar, _key))  # 32 px: the bundled size
