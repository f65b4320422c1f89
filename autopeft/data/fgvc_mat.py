"""FGVC: Stanford Dogs and Stanford Cars, whose official splits are MATLAB files, under the protocol of `fgvc.py`.

torchvision's StanfordCars reads the same layout but cannot download it any more (its original host is gone), and
torchvision has no Stanford Dogs: a missing file is an error saying what to put where.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from autopeft.data.base import DataSplits, Request, register_dataset
from autopeft.data.fgvc import Official, fgvc_splits, locate, missing_images
from autopeft.data.matfile import loadmat
from autopeft.errors import AutopeftError

DOGS_LISTS = ("train_list.mat", "test_list.mat")
CARS_TEST = "cars_test_annos_withlabels.mat"


def _labels(values: np.ndarray, path: Path, num_classes: int | None = None) -> list[int]:
    """1-based labels as 0-based ints, checked to be whole numbers in range."""
    try:
        labels = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise AutopeftError(f"{path} holds labels that are not numbers; replace it with the original") from None
    top = num_classes if num_classes is not None else int(labels.max(initial=0))
    if labels.size == 0 or np.any(labels != np.round(labels)) or labels.min() < 1 or labels.max() > top:
        raise AutopeftError(f"{path} has labels outside 1-{top} (they are 1-based); replace it with the original")
    return [int(v) - 1 for v in labels]


def _dogs_list(folder: Path, lists: Path, name: str) -> tuple[list[str], list[int]]:
    mat = loadmat(lists / name, ("file_list", "labels"), "Stanford Dogs")
    files = [str(f) for f in mat["file_list"].tolist()]
    labels = _labels(mat["labels"], lists / name)
    if len(files) != len(labels):
        raise AutopeftError(f"{lists / name}: file_list and labels differ in length; replace it with the original")
    return files, labels


@register_dataset("stanford_dogs", recipe="fgvc-stanford_dogs")
def load_stanford_dogs(req: Request) -> DataSplits:
    """Stanford Dogs (120 breeds, official 12,000 train / 8,580 test) from `ROOT/stanford_dogs/`.

    `lists/train_list.mat` and `lists/test_list.mat` (lists.tar; also read beside Images/) hold `file_list` (paths
    under Images/, e.g. n02085620-Chihuahua/n02085620_5927.jpg) and `labels` (1-based). A breed's name is its
    Images/ folder's without the WordNet id.
    """
    download = "download images.tar and lists.tar (Stanford Dogs Dataset page) and extract them"
    nested = req.root / "stanford_dogs"
    base = nested if nested.is_dir() else req.root
    lists_dir = "lists" if (base / "lists").is_dir() or not (base / DOGS_LISTS[0]).is_file() else "."
    required = (*(f"{lists_dir}/{n}" if lists_dir != "." else n for n in DOGS_LISTS), "Images")
    folder = locate(req.root, "stanford_dogs", required, "Stanford Dogs", download)
    lists = folder / lists_dir
    (train_files, train_labels), (test_files, test_labels) = (_dogs_list(folder, lists, n) for n in DOGS_LISTS)
    breeds: dict[int, str] = {}
    for file, label in zip(train_files + test_files, train_labels + test_labels, strict=True):
        breed = Path(file).parts[0] if len(Path(file).parts) > 1 else ""
        if breeds.setdefault(label, breed) != breed:
            raise AutopeftError(f"{lists}: label {label + 1} names images of two folders ({breeds[label]}, {breed})")
    num_classes = max(breeds) + 1
    absent = [k + 1 for k in range(num_classes) if k not in breeds]
    if absent:
        raise AutopeftError(f"{lists}: no image has label {absent[0]} of 1-{num_classes}; restore the lists")
    names = [re.sub(r"^n\d+-", "", breeds[k]) or str(k + 1) for k in range(num_classes)]
    images = folder / "Images"
    train = [(str(images / f), y) for f, y in zip(train_files, train_labels, strict=True)]
    test = [(str(images / f), y) for f, y in zip(test_files, test_labels, strict=True)]
    for name, samples in zip(DOGS_LISTS, (train, test), strict=True):
        missing_images(samples, lists / name, "Stanford Dogs")
    return fgvc_splits(req, folder, Official("Stanford Dogs", train, test, names, images))


def _cars_annotations(path: Path, images: Path, num_classes: int) -> list[tuple[str, int]]:
    annotations = loadmat(path, ("annotations",), "Stanford Cars")["annotations"]
    fields = annotations.dtype.names or ()
    if "fname" not in fields or "class" not in fields:
        raise AutopeftError(f"{path}: annotations lack fname/class (a test file without labels?); use {CARS_TEST}")
    labels = _labels(np.array([a["class"] for a in annotations]), path, num_classes)
    samples = [(str(images / str(a["fname"])), y) for a, y in zip(annotations, labels, strict=True)]
    missing_images(samples, path, "Stanford Cars")
    return samples


@register_dataset("stanford_cars", recipe="fgvc-stanford_cars")
def load_stanford_cars(req: Request) -> DataSplits:
    """Stanford Cars (196 models, official 8,144 train / 8,041 test) from `ROOT/stanford_cars/` (torchvision's
    layout): devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat (`annotations`: fname, class 1-based),
    devkit/cars_meta.mat (`class_names`), and the images in cars_train/ and cars_test/."""
    download = (f"download cars_train.tgz, cars_test.tgz, car_devkit.tgz and {CARS_TEST} (Stanford Cars Dataset; "
                "its original page is offline, so from a mirror) and extract them")
    nested = req.root / "stanford_cars"
    base = nested if nested.is_dir() else req.root
    test_annos = f"devkit/{CARS_TEST}" if (base / "devkit" / CARS_TEST).is_file() else CARS_TEST
    required = ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat", test_annos, "cars_train", "cars_test")
    folder = locate(req.root, "stanford_cars", required, "Stanford Cars", download)
    meta = folder / "devkit" / "cars_meta.mat"
    names = [str(n) for n in loadmat(meta, ("class_names",), "Stanford Cars")["class_names"].tolist()]
    train = _cars_annotations(folder / "devkit" / "cars_train_annos.mat", folder / "cars_train", len(names))
    test = _cars_annotations(folder / test_annos, folder / "cars_test", len(names))
    return fgvc_splits(req, folder, Official("Stanford Cars", train, test, names, folder))
