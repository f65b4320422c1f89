"""Oxford Flowers102 in torchvision's layout, with the official 1020 / 1020 / 6149 splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autopeft.data.base import DataSplits, Request, register_dataset
from autopeft.data.datasets import ImageFileDataset
from autopeft.data.matfile import loadmat
from autopeft.errors import AutopeftError

FOLDER = "flowers-102"
NUM_CLASSES = 102
HOST = "thor.robots.ox.ac.uk"  # where torchvision's Flowers102 downloads from
_WHAT = "put jpg/, imagelabels.mat and setid.mat in {0}/flowers-102 (torchvision's layout)"


def find_folder(root: Path) -> Path | None:
    """`ROOT/flowers-102`, or ROOT itself when it is that folder; None when the files are not there."""
    for folder in (root / FOLDER, root):
        if (folder / "jpg").is_dir() and (folder / "imagelabels.mat").is_file() and (folder / "setid.mat").is_file():
            return folder
    return None


def _download(root: Path) -> None:
    import torchvision

    try:
        torchvision.datasets.Flowers102(str(root), split="train", download=True)
    except Exception as exc:  # urllib, OSError, RuntimeError: all mean the same thing here
        raise AutopeftError(
            f"downloading Flowers102 into {root / FOLDER} failed ({exc}); {_WHAT.format(root)}"
        ) from exc


@register_dataset("flowers102", recipe="flowers102")
def load_flowers102(req: Request) -> DataSplits:
    """Flowers102: train 1020 / val 1020 for search, train+val (2040) for the final run, test 6149.

    Reads `ROOT/flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}`; labels 1-102 become 0-101. MD5
    sums are not checked (re-packaged copies and test fixtures differ), the files' contents are.
    """
    folder = find_folder(req.root)
    if folder is None and req.may_download(HOST):
        _download(req.root)
        folder = find_folder(req.root)
    if folder is None:
        raise AutopeftError(
            f"Flowers102 not found under {req.root / FOLDER}: put jpg/, imagelabels.mat and setid.mat there, "
            "or run with network access to download"
        )
    labels = loadmat(folder / "imagelabels.mat", ("labels",), "Flowers102")["labels"].astype(np.int64)
    if labels.size == 0 or labels.min() < 1 or labels.max() > NUM_CLASSES:
        raise AutopeftError(f"{folder / 'imagelabels.mat'} has labels outside 1-{NUM_CLASSES}; replace it")
    split_ids = loadmat(folder / "setid.mat", ("trnid", "valid", "tstid"), "Flowers102")
    ids = {k: v.astype(np.int64) for k, v in split_ids.items()}

    def samples(key: str) -> list[tuple[str, int]]:
        out = []
        for image_id in ids[key].tolist():
            if not 1 <= image_id <= labels.size:
                raise AutopeftError(f"{folder / 'setid.mat'} names image {image_id}, which has no label; replace it")
            out.append((str(folder / "jpg" / f"image_{image_id:05d}.jpg"), int(labels[image_id - 1]) - 1))
        missing = [p for p, _ in out if not Path(p).is_file()]
        if missing:
            raise AutopeftError(
                f"{len(missing)} Flowers102 images of split {key} are missing (first: {missing[0]}); "
                f"restore jpg/ under {folder}"
            )
        return out

    train, val, test = samples("trnid"), samples("valid"), samples("tstid")
    s = req.settings
    return req.splits(
        NUM_CLASSES,
        train=ImageFileDataset(train, s, train=True),
        val=ImageFileDataset(val, s),
        test=ImageFileDataset(test, s),
        train_full=ImageFileDataset(train + val, s, train=True),
    )
