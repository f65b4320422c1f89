"""FGVC: CUB-200-2011 and NABirds in their official text-file layouts, and the split protocol all four FGVC readers
share (official test; train/val drawn from the official train set, or VPT's published split files when present).

Neither dataset (nor Stanford Dogs / Cars, in `fgvc_mat.py`) has a torchvision class that can download it, so a
missing file is an error naming that file and where to get the dataset; nothing is fetched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from autopeft.data.base import DataSplits, Request, register_dataset
from autopeft.data.datasets import ImageFileDataset, stratified_split
from autopeft.errors import AutopeftError

# VPT's FGVC protocol (Jia et al. 2022): 10 % of the official train set, stratified and seeded, is the val split;
# the final run trains on all of it (train + val) and tests once on the official test set.
VAL_FRACTION = 0.1
# VPT ships these per dataset, each mapping an image path (relative to the dataset's image folder) to a label.
VPT_FILES = ("train.json", "val.json", "test.json")
CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")


@dataclass
class Official:
    """A dataset as its own files give it: the official train and test sets and the class names.

    Attributes:
        title: the dataset's name in messages.
        train: (image path, 0-based label) of the official train set.
        test: the same for the official test set.
        class_names: one per label, from the dataset's files.
        image_dir: the folder VPT's split files' paths are relative to.
    """

    title: str
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    class_names: list[str]
    image_dir: Path


def locate(root: Path, folder: str, required: tuple[str, ...], title: str, download: str) -> Path:
    """`ROOT/<folder>`, or ROOT itself when it is that folder, holding every `required` file or folder.

    Raises:
        AutopeftError: naming the first missing file under the folder expected and what to download.
    """
    nested = root / folder
    base = root if not nested.is_dir() and any((root / name).exists() for name in required) else nested
    for name in required:
        if not (base / name).exists():
            raise AutopeftError(
                f"{title} not found: {base / name} is missing; {download} so that {nested} holds "
                f"{', '.join(required)}"
            )
    return base


def missing_images(samples: list[tuple[str, int]], where: Path, title: str) -> None:
    """Raise when any listed image is not on disk (caught now, not in the middle of a trial)."""
    missing = [p for p, _ in samples if not Path(p).is_file()]
    if missing:
        raise AutopeftError(
            f"{len(missing)} {title} images listed in {where} are missing (first: {missing[0]}); restore them"
        )


def _vpt_splits(folder: Path, official: Official) -> list[list[tuple[str, int]]]:
    """train, val and test from VPT's json files; labels mapped as VPT does (sorted ids -> 0..K-1), over all three
    files so that one mapping holds for every split."""
    tables = []
    for name in VPT_FILES:
        path = folder / name
        try:
            table = json.loads(path.read_text())
            if not isinstance(table, dict):
                raise ValueError("not a mapping")
            tables.append({str(k): int(v) for k, v in table.items()})
        except (OSError, ValueError, TypeError) as exc:
            raise AutopeftError(
                f"{path} is not VPT's split file (a JSON mapping image path -> label: {exc}); restore or remove it"
            ) from None
    ids = sorted({v for t in tables for v in t.values()})
    if len(ids) != len(official.class_names):
        raise AutopeftError(
            f"VPT's split files in {folder} hold {len(ids)} classes, {official.title} has "
            f"{len(official.class_names)}; restore them or remove {', '.join(VPT_FILES)} to use the default split"
        )
    index = {v: i for i, v in enumerate(ids)}
    splits = [[(str(official.image_dir / k), index[v]) for k, v in t.items()] for t in tables]
    for name, samples in zip(VPT_FILES, splits, strict=True):
        if not samples:
            raise AutopeftError(f"{folder / name} lists no images; restore it from VPT's release")
        missing_images(samples, folder / name, official.title)
    return splits


def fgvc_splits(req: Request, folder: Path, official: Official) -> DataSplits:
    """The FGVC protocol over `official`: VPT's split files when all three are in `folder`, else a seeded,
    stratified VAL_FRACTION of the official train set as val; train_full = train + val; the official test set."""
    use_vpt = all((folder / name).is_file() for name in VPT_FILES)
    if use_vpt:
        train, val, test = _vpt_splits(folder, official)
    else:
        samples = official.train
        count = max(1, round(VAL_FRACTION * len(samples)))
        if count >= len(samples):
            raise AutopeftError(f"{len(samples)} {official.title} train images are too few to split off val")
        val_idx, train_idx = stratified_split([y for _, y in samples], [count], req.seed)
        train, val, test = [samples[i] for i in train_idx], [samples[i] for i in val_idx], official.test
    s = req.settings
    splits = req.splits(
        len(official.class_names),
        train=ImageFileDataset(train, s, train=True),
        val=ImageFileDataset(val, s),
        test=ImageFileDataset(test, s),
        train_full=ImageFileDataset(train + val, s, train=True),
        class_names=official.class_names,
    )
    if use_vpt:  # other splits of the same files: caches keyed on the fingerprint must not mix them up
        tagged = hashlib.sha256(f"{splits.fingerprint}:vpt-json".encode()).hexdigest()[:16]
        splits = dataclasses.replace(splits, fingerprint=tagged)
    return splits


def read_table(path: Path) -> dict[str, str]:
    """`<id> <value>` lines (the value may hold spaces: NABirds' class names do) as an ordered id -> value map."""
    table: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            raise AutopeftError(f"{path}:{number}: expected '<id> <value>', got {line.strip()!r}; restore the file")
        table[parts[0]] = parts[1]
    if not table:
        raise AutopeftError(f"{path} is empty; restore it from the dataset's release")
    return table


def _int(value: str, path: Path, key: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise AutopeftError(f"{path}: image {key} has {value!r} where a number belongs; restore the file") from None


def read_cub_layout(folder: Path, title: str, strip_number: bool) -> Official:
    """The file set CUB-200-2011 and NABirds share: images.txt (id -> path under images/), image_class_labels.txt
    (id -> class id), train_test_split.txt (id -> 1 train / 0 test) and classes.txt (class id -> name).

    The class ids that images use, in increasing order, become labels 0..K-1: CUB's 1..200 shift by one, NABirds'
    sparse ids (its classes.txt also names the hierarchy's inner nodes) give its 555 leaf classes.
    """
    images, labels, split, classes = (read_table(folder / name) for name in CUB_FILES)
    sets: dict[str, list[tuple[str, int]]] = {"1": [], "0": []}
    used = sorted({_int(v, folder / "image_class_labels.txt", k) for k, v in labels.items()})
    unnamed = [str(c) for c in used if str(c) not in classes]
    if unnamed:
        raise AutopeftError(f"{folder / 'classes.txt'} lacks class {unnamed[0]}, which images use; restore it")
    index = {c: i for i, c in enumerate(used)}
    for key, rel in images.items():
        for table, name in ((labels, "image_class_labels.txt"), (split, "train_test_split.txt")):
            if key not in table:
                raise AutopeftError(f"{folder / name} has no line for image {key} of images.txt; restore it")
        if split[key] not in sets:
            raise AutopeftError(f"{folder / 'train_test_split.txt'}: image {key} is {split[key]!r}, not 1 or 0")
        label = index[_int(labels[key], folder / "image_class_labels.txt", key)]
        sets[split[key]].append((str(folder / "images" / rel), label))
    for which, samples in (("train", sets["1"]), ("test", sets["0"])):
        if not samples:
            raise AutopeftError(f"{folder / 'train_test_split.txt'} puts no image in the {which} set; restore it")
        missing_images(samples, folder / "images.txt", title)
    names = [classes[str(c)] for c in used]
    if strip_number:  # CUB's names carry their id: "001.Black_footed_Albatross"
        names = [re.sub(r"^\d+\.", "", n) for n in names]
    return Official(title, sets["1"], sets["0"], names, folder / "images")


@register_dataset("cub200", recipe="fgvc-cub200")
def load_cub200(req: Request) -> DataSplits:
    """CUB-200-2011 (200 classes, official 5,994 train / 5,794 test) from `ROOT/CUB_200_2011/`."""
    folder = locate(req.root, "CUB_200_2011", (*CUB_FILES, "images"), "CUB-200-2011",
                    "download CUB_200_2011.tgz (Caltech-UCSD Birds-200-2011, CaltechDATA) and extract it")
    return fgvc_splits(req, folder, read_cub_layout(folder, "CUB-200-2011", strip_number=True))


@register_dataset("nabirds", recipe="fgvc-nabirds")
def load_nabirds(req: Request) -> DataSplits:
    """NABirds (555 leaf classes, official 23,929 train / 24,633 test) from `ROOT/nabirds/`.

    hierarchy.txt (child -> parent class id) ships with it and is left unread: images are labelled at the leaves.
    """
    folder = locate(req.root, "nabirds", (*CUB_FILES, "images"), "NABirds",
                    "download nabirds.tar.gz (NABirds, the Cornell Lab of Ornithology's dataset page) and extract it")
    return fgvc_splits(req, folder, read_cub_layout(folder, "NABirds", strip_number=False))
