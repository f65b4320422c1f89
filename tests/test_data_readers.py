"""autopeft.data readers of files on disk, each on a fixture in its exact format (flowers102, vtab1k, imagefolder,
fashion_mnist, cifar10/100): splits, labels, missing and broken files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from data_fixtures import (
    check_items,
    guard_offline,
    labels_of,
    truncate,
    write_cifar,
    write_fashion,
    write_flowers,
    write_idx,
    write_image_folder,
    write_jpeg,
    write_vtab,
)

import autopeft.data.base as base
from autopeft.data import arrays, flowers, load_dataset
from autopeft.errors import AutopeftError

SMALL = dict(input_size=(3, 24, 24), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
PX32 = dict(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    guard_offline(monkeypatch, tmp_path)


# --- flowers102 --------------------------------------------------------------------------------------------------


def make_flowers(root):
    labels = [1, 2, 3, 102, 1, 2, 3, 102, 5, 6, 7, 8]
    return write_flowers(root, trn=[1, 2, 3, 4], val=[5, 6, 7], tst=[8, 9, 10, 11, 12], labels=labels)


def test_flowers102_official_splits(tmp_path):
    folder = make_flowers(tmp_path)
    splits = load_dataset("flowers102", tmp_path, **SMALL)
    assert splits.num_classes == 102 and splits.sizes() == {"train": 4, "val": 3, "test": 5, "train_full": 7}
    assert labels_of(splits.train) == [0, 1, 2, 101] and labels_of(splits.test) == [101, 4, 5, 6, 7]
    assert splits.train_full.samples == splits.train.samples + splits.val.samples
    assert splits.val.samples[0][0] == str(folder / "jpg" / "image_00005.jpg")
    check_items(splits, (3, 24, 24))
    assert load_dataset("flowers102", folder, **SMALL).sizes() == splits.sizes()  # ROOT may be the folder itself


def test_flowers102_missing_files_say_what_to_put_where(tmp_path):
    with pytest.raises(AutopeftError) as err:
        load_dataset("flowers102", tmp_path, download=False)
    assert str(err.value) == (
        f"Flowers102 not found under {tmp_path / 'flowers-102'}: put jpg/, imagelabels.mat and setid.mat there, "
        "or run with network access to download"
    )


def test_flowers102_downloads_only_when_missing_and_online(tmp_path, monkeypatch):
    monkeypatch.delenv("AUTOPEFT_OFFLINE")
    asked, fetched = [], []
    monkeypatch.setattr(base, "network_answers", lambda host, port=443: asked.append(host) or True)
    monkeypatch.setattr(flowers, "_download", lambda root: fetched.append(root) or make_flowers(root))
    assert load_dataset("flowers102", tmp_path, **SMALL).sizes()["test"] == 5
    assert asked == [flowers.HOST] and fetched == [tmp_path]
    load_dataset("flowers102", tmp_path, **SMALL)  # present now: no second look at the network
    assert len(asked) == 1
    monkeypatch.setattr(base, "network_answers", lambda host, port=443: False)
    with pytest.raises(AutopeftError, match="not found"):
        load_dataset("flowers102", tmp_path / "elsewhere")


def test_flowers102_broken_files(tmp_path):
    folder = make_flowers(tmp_path)
    truncate(folder / "jpg" / "image_00002.jpg")
    splits = load_dataset("flowers102", tmp_path, **SMALL)
    with pytest.raises(AutopeftError, match="image_00002.jpg"):
        splits.train[1]
    (folder / "jpg" / "image_00012.jpg").unlink()
    with pytest.raises(AutopeftError, match="image_00012.jpg"):
        load_dataset("flowers102", tmp_path)
    (folder / "setid.mat").write_bytes(b"not a mat file")
    with pytest.raises(AutopeftError, match="setid.mat"):
        load_dataset("flowers102", tmp_path)


# --- vtab1k ------------------------------------------------------------------------------------------------------


def test_vtab_task_lists_and_protocol(tmp_path):
    folder = write_vtab(tmp_path, "dtd", {"train800": 8, "val200": 4, "test": 6}, num_classes=47)
    splits = load_dataset("vtab1k/dtd", tmp_path, **SMALL)
    assert splits.name == "vtab1k/dtd" and splits.num_classes == 47
    assert splits.sizes() == {"train": 8, "val": 4, "test": 6, "train_full": 12}
    assert splits.train.samples[0] == (str(folder / "images" / "train" / "train800000000.jpg"), 0)
    assert labels_of(splits.val) == [0, 1, 2, 3]
    assert splits.train_full.samples == splits.train.samples + splits.val.samples  # read from train800val200.txt
    check_items(splits, (3, 24, 24))
    assert load_dataset("vtab1k/dtd", tmp_path / "vtab-1k", **SMALL).sizes() == splits.sizes()


def test_vtab_missing_and_malformed_lists(tmp_path):
    with pytest.raises(AutopeftError, match="train800.txt, val200.txt, train800val200.txt, test.txt"):
        load_dataset("vtab1k/eurosat", tmp_path)
    folder = write_vtab(tmp_path, "eurosat", {"train800": 3, "val200": 2, "test": 2}, num_classes=10)
    (folder / "test.txt").write_text("images/test/test000000.jpg 3\nimages/test/test000001.jpg\n")
    with pytest.raises(AutopeftError, match="test.txt:2"):
        load_dataset("vtab1k/eurosat", tmp_path)
    (folder / "test.txt").write_text("images/test/test000000.jpg 10\n")
    with pytest.raises(AutopeftError, match="outside 0-9"):
        load_dataset("vtab1k/eurosat", tmp_path)
    (folder / "test.txt").write_text("images/test/gone.jpg 1\n")
    with pytest.raises(AutopeftError, match="gone.jpg"):
        load_dataset("vtab1k/eurosat", tmp_path)


# --- imagefolder -------------------------------------------------------------------------------------------------


def test_flat_image_folder_is_split_stratified_and_seeded(tmp_path):
    root = write_image_folder(tmp_path / "pets", {"cat": 10, "dog": 10, "emu": 5})
    splits = load_dataset(str(root), **SMALL)
    assert splits.name == f"imagefolder:{root}" and splits.class_names == ["cat", "dog", "emu"]
    assert splits.sizes() == {"train": 15, "val": 5, "test": 5, "train_full": 20}
    paths = [set(p for p, _ in splits.split(s).samples) for s in ("train", "val", "test")]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert len(set.union(*paths)) == 25
    assert sorted(labels_of(splits.val)) == [0, 0, 1, 1, 2]  # 20 % of each class
    check_items(splits, (3, 24, 24))
    again = load_dataset(splits.name, **SMALL)  # the name round-trips
    assert again.test.samples == splits.test.samples and again.fingerprint == splits.fingerprint
    assert load_dataset("imagefolder", root, **SMALL).val.samples == splits.val.samples
    assert load_dataset(str(root), seed=5, **SMALL).val.samples != splits.val.samples


def test_image_folder_with_split_folders(tmp_path):
    root = tmp_path / "data"
    write_image_folder(root / "train", {"a": 6, "b": 4})
    write_image_folder(root / "valid", {"a": 2, "b": 1})
    write_image_folder(root / "test", {"b": 3})
    write_jpeg(root / "test" / "a" / "grey.png", 9, mode="L")
    splits = load_dataset(str(root), **SMALL)
    assert splits.sizes() == {"train": 10, "val": 3, "test": 4, "train_full": 13}
    assert sorted(labels_of(splits.test)) == [0, 1, 1, 1]
    assert all(x.shape == (3, 24, 24) for x, _ in (splits.test[i] for i in range(4)))  # greyscale -> RGB
    write_image_folder(root / "test", {"c": 1})
    with pytest.raises(AutopeftError, match="absent from train"):
        load_dataset(str(root))


def test_image_folder_without_val_draws_it_from_train(tmp_path):
    root = tmp_path / "data"
    write_image_folder(root / "train", {"a": 10, "b": 10})
    write_image_folder(root / "test", {"a": 1, "b": 1})
    splits = load_dataset(str(root), **SMALL)
    assert splits.sizes() == {"train": 16, "val": 4, "test": 2, "train_full": 20}


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(AutopeftError, match="no images found"):
        load_dataset(str(tmp_path / "empty"))
    root = write_image_folder(tmp_path / "x", {"a": 5, "b": 5})
    truncate(root / "a" / "001.jpg", keep=0.3)
    splits = load_dataset(str(root), **SMALL)
    with pytest.raises(AutopeftError, match="001.jpg"):
        for s in ("train", "val", "test"):
            for i in range(len(splits.split(s))):
                splits.split(s)[i]


# --- in-memory arrays on disk: fashion_mnist, cifar --------------------------------------------------------------


@pytest.mark.parametrize("where", ["torchvision", "debian"])
def test_fashion_mnist_layouts(tmp_path, monkeypatch, where):
    if where == "torchvision":
        write_fashion(tmp_path / "FashionMNIST" / "raw", gz=False)
    else:
        monkeypatch.setattr(arrays, "DEBIAN_FASHION", write_fashion(tmp_path / "debian"))
    splits = load_dataset("fashion_mnist", tmp_path, **PX32)
    assert splits.num_classes == 10 and splits.class_names[9] == "Ankle boot"
    assert splits.sizes() == {"train": 800, "val": 200, "test": 30, "train_full": 1000}
    x, y = splits.test.batch(range(30))
    assert y.tolist() == [i % 10 for i in range(30)]
    # 28 px shown unchanged at 32 px with 2 px of black: image i is filled with i / 255 (normalised 2v - 1)
    inner = x[:, :, 2:30, 2:30]
    assert torch.allclose(inner, (torch.arange(30.0) / 255 * 2 - 1).view(30, 1, 1, 1).expand_as(inner), atol=1e-6)
    assert torch.all(x[:, :, :2] == -1) and torch.all(x[:, :, :, 30:] == -1)


def test_fashion_mnist_missing_and_truncated(tmp_path):
    with pytest.raises(AutopeftError, match="dataset-fashion-mnist") as err:
        load_dataset("fashion_mnist", tmp_path)
    assert "FashionMNIST/raw" in str(err.value) and "t10k-images-idx3-ubyte.gz" in str(err.value)
    raw = write_fashion(tmp_path / "FashionMNIST" / "raw")
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.zeros(30, np.uint8))
    truncate(raw / "t10k-labels-idx1-ubyte.gz", keep=0.6)
    with pytest.raises(AutopeftError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("fashion_mnist", tmp_path)


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_layouts(tmp_path, name, classes):
    folder = write_cifar(tmp_path, classes)
    splits = load_dataset(name, tmp_path, **SMALL)
    assert splits.num_classes == classes and splits.class_names[-1] == f"class{classes - 1}"
    assert splits.sizes() == {"train": 800, "val": 200, "test": 40, "train_full": 1000}
    counts = np.bincount(labels_of(splits.train), minlength=classes)
    assert counts.max() - counts.min() <= 1
    test_file = folder / ("test_batch" if classes == 10 else "test")
    raw = pickle.loads(test_file.read_bytes())["data"][0].reshape(3, 32, 32)
    x = splits.test[0][0]
    assert x.shape == (3, 24, 24) and abs(x.mean().item() - (raw.mean() / 255 * 2 - 1)) < 0.05
    truncate(test_file)
    with pytest.raises(AutopeftError, match=test_file.name):
        load_dataset(name, tmp_path)
