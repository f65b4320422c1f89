"""autopeft.data: every reader on fixtures in its exact on-disk format, splits, transforms and errors."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from data_fixtures import check_items, guard_offline, labels_of, write_image_folder, write_jpeg
from sklearn.datasets import load_digits
from timm.data import create_transform
from torch.utils.data import DataLoader

import autopeft.data.base as base
from autopeft.data import (
    VTAB_TASKS,
    data_config,
    default_root,
    list_datasets,
    load_dataset,
    register_dataset,
    stratified_split,
)
from autopeft.errors import AutopeftError

VTAB_CLASSES = dict(
    cifar=100, caltech101=102, dtd=47, oxford_flowers102=102, oxford_iiit_pet=37, svhn=10, sun397=397,
    patch_camelyon=2, eurosat=10, resisc45=45, diabetic_retinopathy=5, clevr_count=8, clevr_dist=6, dmlab=6, kitti=4,
    dsprites_loc=16, dsprites_ori=16, smallnorb_azi=18, smallnorb_ele=9,
)  # fmt: skip
REAL_PROBE = base.network_answers  # before any test's guard replaces it

PX32 = dict(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    guard_offline(monkeypatch, tmp_path)


# --- registry and protocol ---------------------------------------------------------------------------------------


def test_registry_lists_every_reader_and_vtab_task():
    names = list_datasets()
    assert {"flowers102", "imagefolder", "digits", "fashion_mnist", "cifar10", "cifar100"} <= set(names)
    assert sorted(n for n in names if n.startswith("vtab1k/")) == sorted(f"vtab1k/{t}" for t in VTAB_TASKS)
    assert VTAB_TASKS == VTAB_CLASSES
    with pytest.raises(ValueError, match="twice"):
        register_dataset("digits")(lambda req: None)


@pytest.mark.parametrize("name, hint", [("digitz", "did you mean digits"), ("vtab1k/cifra", "vtab1k/cifar")])
def test_unknown_dataset_names_the_choices(name, hint):
    with pytest.raises(AutopeftError, match=hint) as err:
        load_dataset(name)
    assert "\n" not in str(err.value)


def test_default_root_and_bad_root(tmp_path, monkeypatch):
    assert default_root() == tmp_path / "default-root"
    monkeypatch.delenv("AUTOPEFT_DATA")
    assert default_root().parts[-3:] == (".cache", "autopeft", "data")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(AutopeftError, match="is a file"):
        load_dataset("digits", a_file)
    with pytest.raises(AutopeftError, match="does not exist"):
        load_dataset(str(tmp_path / "nowhere" / "folder"))


@pytest.mark.parametrize("seed", [0, 3])
def test_stratified_split_is_exact_disjoint_balanced_and_seeded(seed):
    labels = np.repeat(np.arange(7), [50, 31, 80, 12, 64, 40, 23])
    parts = stratified_split(labels, [100, 60], seed)
    assert [len(p) for p in parts] == [100, 60, len(labels) - 160]
    joined = np.concatenate(parts)
    assert len(set(joined.tolist())) == len(labels) == len(joined)
    left = Counter(labels.tolist())
    for part, count in zip(parts[:2], [100, 60], strict=True):
        total = sum(left.values())
        got = Counter(labels[part].tolist())
        for c in left:  # each class within one image of its share of what was left
            assert abs(got[c] - count * left[c] / total) < 1
        left = left - got
    again = stratified_split(labels, [100, 60], seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = stratified_split(labels, [100, 60], seed + 1)
    assert not np.array_equal(parts[0], other[0])
    with pytest.raises(AutopeftError):
        stratified_split(labels, [300, 10], seed)


# --- digits (embedded) -------------------------------------------------------------------------------------------


def test_digits_protocol_geometry_and_determinism():
    splits = load_dataset("digits", **PX32)
    assert splits.name == "digits" and splits.num_classes == 10 and splits.class_names == [str(d) for d in range(10)]
    assert splits.sizes() == {"train": 800, "val": 200, "test": 797, "train_full": 1000}
    check_items(splits, (3, 32, 32))
    per_class = Counter(load_digits().target.tolist())
    for split, size in (("train", 800), ("val", 200), ("test", 797)):
        counts = Counter(labels_of(splits.split(split)))
        assert all(abs(counts[c] - size * n / 1797) < 1 for c, n in per_class.items())  # class-balanced
    x, _ = splits.train.batch(range(len(splits.train)))
    full, _ = splits.train_full.batch(range(800))
    assert torch.equal(x, full)  # train_full = train + val, in that order
    black = -1.0  # 0 in [0, 1] normalised with mean = std = 0.5
    assert torch.all(x[:, :, :2] == black) and torch.all(x[:, :, :, -2:] == black)  # 28-px glyph, 2 px padding
    assert torch.equal(x[:, 0], x[:, 2])  # greyscale replicated
    assert x.max() > 0.5
    again = load_dataset("digits", **PX32)
    assert torch.equal(again.val.batch([0, 5])[0], splits.val.batch([0, 5])[0])
    assert labels_of(load_dataset("digits", seed=1, **PX32).train) != labels_of(splits.train)


def test_digits_scale_to_any_input_and_work_with_dataloader():
    splits = load_dataset("digits", input_size=(3, 64, 48))
    loader = DataLoader(splits.val, batch_size=16, shuffle=True)
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 64, 48) and y.dtype == torch.long
    copy = pickle.loads(pickle.dumps(splits.val))  # as Ray ships it to a trial; the cache stays behind
    assert copy._prepared is None and torch.equal(copy.batch([1, 2])[0], splits.val.batch([1, 2])[0])
    mono = load_dataset("digits", input_size=(1, 16, 16), mean=(0.5,), std=(0.5,))
    assert mono.test[0][0].shape == (1, 16, 16)


def test_augmentation_touches_train_splits_only():
    splits = load_dataset("digits", augment=True, **PX32)
    torch.manual_seed(0)
    first, second = splits.train.batch(range(64))[0], splits.train.batch(range(64))[0]
    assert not torch.equal(first, second)
    assert torch.equal(splits.val.batch(range(8))[0], splits.val.batch(range(8))[0])
    assert torch.equal(splits.test[3][0], splits.test[3][0])
    plain = load_dataset("digits", **PX32)
    assert torch.equal(plain.val.batch(range(8))[0], splits.val.batch(range(8))[0])


def test_fingerprint_is_stable_and_tracks_what_matters(tmp_path):
    fp = load_dataset("digits", **PX32).fingerprint
    assert fp == load_dataset("digits", **PX32).fingerprint
    changed = [
        load_dataset("digits", seed=1, **PX32),
        load_dataset("digits", augment=True, **PX32),
        load_dataset("digits", input_size=(3, 28, 28)),
        load_dataset("digits", tmp_path, **PX32),
    ]
    assert len({fp, *(s.fingerprint for s in changed)}) == 5


def test_split_by_name():
    splits = load_dataset("digits", **PX32)
    assert splits.split("train_full") is splits.train_full
    with pytest.raises(AutopeftError, match="train_full"):
        splits.split("validation")


# --- transforms --------------------------------------------------------------------------------------------------


def test_data_config_from_name_and_model():
    cfg = data_config("vit_base_patch16_224.augreg_in21k")
    assert cfg == {"input_size": (3, 224, 224), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic"}
    model = timm.create_model("test_vit", pretrained=False)
    assert data_config(model)["input_size"] == tuple(model.pretrained_cfg["input_size"])
    assert load_dataset("digits", **data_config("test_vit")).val[0][0].shape == (3, 160, 160)
    with pytest.raises(AutopeftError, match="unknown backbone"):
        data_config("no_such_model")


@pytest.mark.parametrize("bad", [dict(input_size=(2, 32, 32)), dict(interpolation="spline"), dict(std=(0, 1, 1))])
def test_bad_transform_settings(bad):
    with pytest.raises(AutopeftError):
        load_dataset("digits", **bad)


def test_file_images_match_timm_eval_pipeline(tmp_path):
    path = write_jpeg(tmp_path / "pics" / "a" / "0.jpg", 1, size=(40, 30))
    write_image_folder(tmp_path / "pics", {"a": 5, "b": 5})
    splits = load_dataset(str(tmp_path / "pics"), input_size=(3, 24, 24), interpolation="bilinear")
    index = [p for p, _ in splits.train_full.samples].index(str(path))
    expected = create_transform((3, 24, 24), interpolation="bilinear", crop_pct=1.0, crop_mode="squash")
    from PIL import Image

    with Image.open(path) as img:
        assert torch.allclose(splits.train_full[index][0], expected(img.convert("RGB")), atol=1e-5)
    assert torch.equal(splits.train_full[index][0], splits.train_full[index][0])  # the cached copy


def test_network_probe_gives_up_quickly():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: the connection is refused at once
    assert REAL_PROBE("127.0.0.1", port, timeout=2.0) is False


def test_decoded_images_are_shared_by_later_datasets_of_the_process(tmp_path, monkeypatch) -> None:
    """Where the pixel store is off: a reused search worker's next trial loads the dataset anew and decodes no file
    again; a changed file, another input size or augmentation misses; AUTOPEFT_IMAGE_CACHE_MB=0 keeps nothing."""
    import os

    import autopeft.data.datasets as ds

    monkeypatch.setenv("AUTOPEFT_PIXEL_CACHE_MB", "0")
    folder = write_image_folder(tmp_path / "imgs", {"a": 6, "b": 6})
    monkeypatch.setattr(ds, "PIXELS", ds.PixelCache())
    reads = []
    real = ds.read_image
    monkeypatch.setattr(ds, "read_image", lambda path, mode="RGB": reads.append(str(path)) or real(path, mode))

    def items(**kw) -> list[torch.Tensor]:
        splits = load_dataset(str(folder), seed=0, **{**PX32, **kw})
        return [splits.train[i][0] for i in range(len(splits.train))]

    first = items()
    n = len(reads)
    assert n == len(first) > 0 and len(ds.PIXELS) == n
    second = items()
    assert len(reads) == n  # nothing read again
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    items(input_size=(3, 24, 24))
    assert len(reads) == 2 * n  # another size is another entry
    changed = reads[0]  # a train image, rewritten with other pixels
    write_jpeg(Path(changed), seed=999)
    os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10**9))
    before = len(reads)
    third = items()
    assert reads[before:] == [changed]  # only the changed file is read again, and its new pixels are served
    assert not torch.equal(third[0], first[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1:], third[1:], strict=True))
    before = len(reads)
    items(augment=True)
    assert len(reads) == before + n  # augmented images are never cached
    monkeypatch.setenv("AUTOPEFT_IMAGE_CACHE_MB", "0")
    monkeypatch.setattr(ds, "PIXELS", ds.PixelCache())
    items()
    items()
    assert len(ds.PIXELS) == 0
