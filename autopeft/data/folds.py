"""K-fold cross-validation over a dataset's train_full (its train and val images together), for choosing among a
study's best trials with less noise than one val split gives (`autopeft search --select cv:5`).

    fold = cv_splits(data, folds=5, fold=2, seed=0)   # fold.train: 4/5 of train_full, fold.val: the other 1/5

Folds are stratified (every class spread over them in proportion) and seeded; a fold's train part keeps
train_full's augmentation, its held-out part is read as an evaluation split (no augmentation). The test split is
never part of a fold: a fold's `test` is empty.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from autopeft.data.base import DataSplits
from autopeft.data.datasets import stratified_split
from autopeft.defaults import MAX_FOLDS
from autopeft.errors import AutopeftError


class IndexedView(Dataset):
    """The items of `dataset` at `indices`, keeping what the training loop reads of a split: its transform
    `settings`, whether it `augment`s, its `targets`, and batched reads (`__getitems__`)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int] | np.ndarray) -> None:
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        self.settings = getattr(dataset, "settings", None)
        self.augment = bool(getattr(dataset, "augment", False))

    @property
    def targets(self) -> list[int]:
        labels = _targets(self.dataset)
        return [labels[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        picked = [self.indices[i] for i in indices]
        batched = getattr(self.dataset, "__getitems__", None)
        return list(batched(picked)) if batched else [self.dataset[i] for i in picked]


def _targets(dataset: Dataset) -> list[int]:
    labels = getattr(dataset, "targets", None)
    if labels is None:
        raise AutopeftError(f"cross-validation needs the labels of the train split; {type(dataset).__name__} does "
                            "not expose `targets`")
    return list(labels)


def eval_view(dataset: Dataset) -> Dataset:
    """`dataset` read as an evaluation split: itself when it does not augment, else its `as_eval()` copy."""
    if not getattr(dataset, "augment", False):
        return dataset
    as_eval = getattr(dataset, "as_eval", None)
    if as_eval is None:
        raise AutopeftError(f"cross-validation with augmentation needs a non-augmented view of the train split; "
                            f"{type(dataset).__name__} has no as_eval()")
    return as_eval()


def check_folds(folds: int, images: int | None = None) -> None:
    """Raise AutopeftError unless `folds` is 2..MAX_FOLDS and (given `images`) leaves every fold an image."""
    if not 2 <= folds <= MAX_FOLDS:
        raise AutopeftError(f"cross-validation needs 2 to {MAX_FOLDS} folds, got {folds}")
    if images is not None and images < 2 * folds:
        raise AutopeftError(f"{images} train+val images are too few for {folds} folds; use fewer folds or --select val")


def fold_indices(labels: Sequence[int] | np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """`folds` disjoint, stratified, seeded index arrays covering every image once (sizes differ by at most one)."""
    n = len(labels)
    check_folds(folds, n)
    counts = [n // folds + (1 if i < n % folds else 0) for i in range(folds)]
    return stratified_split(labels, counts[:-1], seed)  # the last fold is what the others leave


def cv_splits(data: DataSplits, folds: int, fold: int, seed: int) -> DataSplits:
    """Fold `fold` of `folds` over `data.train_full`: train on the other folds, evaluate (as `val`) on this one."""
    if not 0 <= fold < folds:
        raise AutopeftError(f"fold {fold} is not one of 0..{folds - 1}")
    parts = fold_indices(_targets(data.train_full), folds, seed)
    held = parts[fold]
    train = np.sort(np.concatenate([p for i, p in enumerate(parts) if i != fold]))
    out = copy.copy(data)
    out.train = IndexedView(data.train_full, train)
    out.val = IndexedView(eval_view(data.train_full), held)
    out.train_full = out.train
    out.test = IndexedView(data.test, [])
    out.fingerprint = f"{data.fingerprint}-cv{folds}.{fold}.{seed}"  # feature caches key on it
    return out
