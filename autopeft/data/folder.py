"""Any folder of class sub-folders: with train/ (val/, test/) sub-folders, or flat with a stratified seeded split."""

from __future__ import annotations

from pathlib import Path

from autopeft.data.base import DataSplits, Request, register_dataset
from autopeft.data.datasets import IMAGE_EXTENSIONS, ImageFileDataset, stratified_split
from autopeft.errors import AutopeftError

SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
# Shares of a flat folder (or of train/ when val/ or test/ is absent) drawn for validation and test.
VAL_FRACTION = 0.2
TEST_FRACTION = 0.2


def scan(folder: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image files (searched recursively) for each sub-folder of `folder`."""
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        classes[sub.name] = sorted(f for f in sub.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
    return classes


def _labelled(found: dict[str, list[Path]], index: dict[str, int], where: Path) -> list[tuple[str, int]]:
    unknown = sorted(set(found) - set(index))
    if unknown:
        raise AutopeftError(f"{where} has classes absent from train/ ({', '.join(unknown[:5])}); add them to train/")
    return [(str(f), index[c]) for c, files in found.items() for f in files]


def _classes(found: dict[str, list[Path]], where: Path) -> list[str]:
    if not any(found.values()):
        raise AutopeftError(
            f"no images found in class sub-folders of {where}: put one folder per class with images "
            f"({', '.join(IMAGE_EXTENSIONS)}), optionally under train/, val/ and test/"
        )
    empty = [c for c, files in found.items() if not files]
    if empty:
        raise AutopeftError(
            f"class folders without images in {where}: {', '.join(empty[:5])}; add images or remove them"
        )
    return list(found)


def _carve(samples: list[tuple[str, int]], fractions: list[float], seed: int) -> list[list[tuple[str, int]]]:
    """Split samples stratified: one part per fraction, then the rest (which keeps at least one image)."""
    counts = [max(1, round(f * len(samples))) for f in fractions]
    if sum(counts) >= len(samples):
        raise AutopeftError(f"{len(samples)} images are too few to split off validation/test; add images")
    parts = stratified_split([y for _, y in samples], counts, seed)
    return [[samples[i] for i in part] for part in parts]


@register_dataset("imagefolder")
def load_imagefolder(req: Request) -> DataSplits:
    """An image-classification folder, in one of two layouts.

    `ROOT/train/<class>/*` with `ROOT/val/<class>/*` (or valid/, validation/) and `ROOT/test/<class>/*`: the
    given splits; one missing is drawn from train/ (20 %, stratified, seeded). Otherwise `ROOT/<class>/*`: a
    stratified seeded 60 / 20 / 20 split. train_full is train + val. Classes are the sorted folder names.
    """
    folder = req.root
    if not folder.is_dir():
        raise AutopeftError(f"image folder {folder} does not exist; pass a folder of class sub-folders")
    found_dirs = {
        split: next((folder / n for n in names if (folder / n).is_dir()), None)
        for split, names in SPLIT_FOLDERS.items()
    }
    if found_dirs["train"] is not None:
        train_dir = found_dirs["train"]
        found = scan(train_dir)
        classes = _classes(found, train_dir)
        index = {c: i for i, c in enumerate(classes)}
        train = _labelled(found, index, train_dir)
        given = {s: _labelled(scan(d), index, d) for s, d in found_dirs.items() if d is not None and s != "train"}
        missing = [s for s in ("val", "test") if s not in given]
        fractions = {"val": VAL_FRACTION, "test": TEST_FRACTION}
        *drawn, train = _carve(train, [fractions[s] for s in missing], req.seed) if missing else [train]
        given.update(zip(missing, drawn, strict=True))
        val, test = given["val"], given["test"]
    else:
        found = scan(folder)
        classes = _classes(found, folder)
        index = {c: i for i, c in enumerate(classes)}
        val, test, train = _carve(_labelled(found, index, folder), [VAL_FRACTION, TEST_FRACTION], req.seed)
    for split, samples in (("val", val), ("test", test)):
        if not samples:
            raise AutopeftError(f"the {split} split of {folder} has no images; add some or remove its folder")
    s = req.settings
    return req.splits(
        len(classes),
        train=ImageFileDataset(train, s, train=True),
        val=ImageFileDataset(val, s),
        test=ImageFileDataset(test, s),
        train_full=ImageFileDataset(train + val, s, train=True),
        class_names=classes,
    )
