"""In-memory sources: scikit-learn's 8×8 digits (the offline default) and Fashion-MNIST, on a VTAB-1k-like protocol.

Protocol: a stratified seeded 800 train / 200 val draw for the search, train_full = those 1,000 for the final run,
test = the official test set (or, for digits, which has none, the 797 images left over). Greyscale images are
scaled to [0, 1] and shown centred: the glyph takes 28/32 of each side of the input on a zero background (at 32 px:
Fashion-MNIST unchanged plus 2 px padding, digits upsampled 8 → 28 plus 2 px, the format of the bundled 32-px
backbone), then replicated to the model's channels.
"""

from __future__ import annotations

import functools
import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from autopeft.data.base import DataSplits, Request, register_dataset
from autopeft.data.datasets import TensorImageDataset, stratified_split
from autopeft.data.transforms import GLYPH_FRACTION
from autopeft.errors import AutopeftError

TRAIN_SIZE, VAL_SIZE = 800, 200

FASHION_FOLDER = Path("FashionMNIST") / "raw"
# Debian's dataset-fashion-mnist package (recompressed, so torchvision's MD5 check rejects it; we read it as is).
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_HOST = ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80)  # torchvision's mirror, plain http


def vtab_like_splits(
    req: Request,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    class_names: list[str] | None,
    test: tuple[np.ndarray, np.ndarray] | None = None,
    fraction: float = 1.0,
    hflip: bool = False,
) -> DataSplits:
    """Draw 800 / 200 stratified (seeded) from `images`; test is `test`, or the images left over when None.

    Images are N×h×w (greyscale) or N×c×h×w arrays, uint8 0-255 or float 0-1; only the drawn ones are copied.
    """
    train_idx, val_idx, rest_idx = stratified_split(labels, [TRAIN_SIZE, VAL_SIZE], req.seed)
    full_idx = np.concatenate([train_idx, val_idx])
    test_images, test_labels = test if test is not None else (images[rest_idx], labels[rest_idx])

    def make(array: np.ndarray, y: np.ndarray, train: bool = False) -> TensorImageDataset:
        x = torch.from_numpy(np.array(array))  # a private, writeable copy (the source may be a shared cache)
        return TensorImageDataset(
            x.unsqueeze(1) if x.ndim == 3 else x,
            torch.from_numpy(np.asarray(y, np.int64)),
            req.settings,
            train=train,
            fraction=fraction,
            hflip=hflip,
        )

    return req.splits(
        num_classes,
        train=make(images[train_idx], labels[train_idx], train=True),
        val=make(images[val_idx], labels[val_idx]),
        test=make(test_images, test_labels),
        train_full=make(images[full_idx], labels[full_idx], train=True),
        class_names=class_names,
    )


@register_dataset("digits", small_images=True)
def load_digits(req: Request) -> DataSplits:
    """scikit-learn's 1,797 handwritten digits (8×8, values 0-16), shipped inside scikit-learn: no files needed.

    800 train / 200 val / 797 test, stratified and seeded; no flips when augmenting (a mirrored 2 is no 2).
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    return vtab_like_splits(req, images, labels, 10, [str(d) for d in range(10)], fraction=GLYPH_FRACTION)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (uint8 payload, as MNIST-style datasets ship), gzipped or not; cached per file version."""
    stat = path.stat()
    return _read_idx(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_idx(path: str, mtime_ns: int, size: int) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise AutopeftError(f"{path} is unreadable or truncated ({exc}); replace it") from exc
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise AutopeftError(f"{path} is not an IDX file of unsigned bytes; replace it with the original")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(dims)):
        raise AutopeftError(f"{path} holds {len(data) - header} bytes for shape {dims}: truncated; replace it")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()
    array.flags.writeable = False  # shared by every caller through the cache
    return array


FASHION_TEST = ("test_images", "test_labels")  # all that the structured tasks of autopeft.data.synthetic read


def fashion_folders(root: Path) -> tuple[Path, Path]:
    """Where the Fashion-MNIST files are looked for, in order: torchvision's `ROOT/FashionMNIST/raw`, Debian's."""
    return root / FASHION_FOLDER, DEBIAN_FASHION


def _fashion_file(folder: Path, key: str) -> Path | None:
    stem = FASHION_FILES[key]
    return next((folder / (stem + ext) for ext in ("", ".gz") if (folder / (stem + ext)).is_file()), None)


def find_fashion(root: Path, keys: tuple[str, ...] = tuple(FASHION_FILES)) -> dict[str, Path] | None:
    """The Fashion-MNIST files `keys` names (default all four), gzipped or not, from the first folder of
    `fashion_folders(root)` that holds every one of them; None when none does."""
    for folder in fashion_folders(root):
        found = {key: path for key in keys if (path := _fashion_file(folder, key)) is not None}
        if len(found) == len(keys):
            return found
    return None


def find_fashion_test(root: Path) -> dict[str, Path] | None:
    """The two Fashion-MNIST test files (images and labels), wherever `find_fashion` would look; the train pair
    is not needed (only `fashion_mnist` itself and the backbone's pretraining read it)."""
    return find_fashion(root, FASHION_TEST)


def fashion_missing(root: Path, keys: tuple[str, ...] = tuple(FASHION_FILES)) -> str:
    """One line naming, for each folder searched, which of the files `keys` names it lacks."""
    lacks = []
    for folder in fashion_folders(root):
        missing = [FASHION_FILES[key] + "(.gz)" for key in keys if _fashion_file(folder, key) is None]
        lacks.append(f"nothing in {folder}" if len(missing) == len(keys) else f"{folder} lacks {', '.join(missing)}")
    return "; ".join(lacks)


@register_dataset("fashion_mnist", small_images=True)
def load_fashion_mnist(req: Request) -> DataSplits:
    """Fashion-MNIST (28×28 greyscale, 10 classes): 800 / 200 drawn from the 60,000 train images, official test."""
    files = find_fashion(req.root)
    if files is None and req.may_download(*FASHION_HOST):
        import torchvision

        try:
            torchvision.datasets.FashionMNIST(str(req.root), train=True, download=True)
        except Exception as exc:  # any failure of the download means the same to the user
            raise AutopeftError(f"downloading Fashion-MNIST into {req.root / FASHION_FOLDER} failed ({exc})") from exc
        files = find_fashion(req.root)
    if files is None:
        raise AutopeftError(
            f"Fashion-MNIST not found ({fashion_missing(req.root)}): put "
            f"{', '.join(s + '.gz' for s in FASHION_FILES.values())} in {req.root / FASHION_FOLDER} "
            "(or apt install dataset-fashion-mnist), or run with network access to download"
        )
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise AutopeftError(f"{files[split + '_images']} and its labels disagree in shape; replace them")
        if labels.max(initial=0) >= len(FASHION_CLASSES):
            raise AutopeftError(f"{files[split + '_labels']} has labels outside 0-9; replace it")
    test = (arrays["test_images"], arrays["test_labels"].astype(np.int64))
    return vtab_like_splits(
        req,
        arrays["train_images"],
        arrays["train_labels"].astype(np.int64),
        10,
        FASHION_CLASSES,
        test=test,
        fraction=GLYPH_FRACTION,
        hflip=True,
    )
