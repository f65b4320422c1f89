"""Cross-validation folds over train+val (`--select cv:K`): disjoint, covering, stratified, seeded, never test."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from data_fixtures import write_image_folder

from autopeft.data import load_dataset
from autopeft.data.folds import IndexedView, cv_splits, fold_indices
from autopeft.errors import AutopeftError

PX32 = dict(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_folds_are_disjoint_cover_every_image_and_are_stratified(folds):
    labels = np.repeat(np.arange(7), [30, 30, 17, 9, 50, 5, 11])
    parts = fold_indices(labels, folds, seed=3)
    assert len(parts) == folds
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and len(set(joined.tolist())) == len(labels)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for c, total in Counter(labels.tolist()).items():
        per_fold = [int((labels[p] == c).sum()) for p in parts]
        assert max(per_fold) - min(per_fold) <= 2 and sum(per_fold) == total, (c, per_fold)


def test_folds_are_seeded():
    labels = np.repeat(np.arange(4), 25)
    same = [p.tolist() for p in fold_indices(labels, 5, seed=1)]
    assert same == [p.tolist() for p in fold_indices(labels, 5, seed=1)]
    assert same != [p.tolist() for p in fold_indices(labels, 5, seed=2)]


@pytest.mark.parametrize("folds,n", [(1, 100), (21, 100), (5, 9)])
def test_bad_fold_counts_are_refused(folds, n):
    with pytest.raises(AutopeftError, match="fold"):
        fold_indices(np.zeros(n, dtype=int), folds, seed=0)


def test_a_fold_trains_on_the_others_and_holds_out_its_own_as_val():
    data = load_dataset("digits", augment=True, **PX32)
    full = data.train_full
    held_out = []
    for fold in range(4):
        f = cv_splits(data, 4, fold, seed=0)
        assert isinstance(f.train, IndexedView) and isinstance(f.val, IndexedView)
        train, val = set(f.train.indices), set(f.val.indices)
        assert not train & val and len(train) + len(val) == len(full) == 1000
        assert len(f.test) == 0  # the test split is never part of a fold
        assert f.train.augment and not f.val.augment  # the held-out fold is read as an evaluation split
        assert f.train.settings is full.settings
        x, y = f.val.__getitems__([0, 1])[0]
        ref_x, ref_y = full.as_eval()[f.val.indices[0]]
        assert torch.equal(x, ref_x) and y == ref_y
        assert f.val.targets == [full.targets[i] for i in f.val.indices]
        assert f.fingerprint not in (data.fingerprint, *held_out)
        held_out.append(f.fingerprint)
    with pytest.raises(AutopeftError, match="fold 4"):
        cv_splits(data, 4, 4, seed=0)


def test_image_file_folds_read_the_held_out_fold_without_augmentation(tmp_path):
    root = write_image_folder(tmp_path / "imgs", {"a": 12, "b": 12})
    data = load_dataset(str(root), augment=True, **PX32)
    f = cv_splits(data, 3, 1, seed=0)
    assert f.train.augment and not f.val.augment
    index = f.val.indices[0]
    assert torch.equal(f.val[0][0], data.train_full.as_eval()[index][0])
