"""The 19 VTAB-1k tasks in the layout NOAH and V-PETL distribute (`vtab-1k/<task>/*.txt` + `images/`)."""

from __future__ import annotations

import functools
from pathlib import Path

from autopeft.data.base import DataSplits, Request, register_dataset
from autopeft.data.datasets import ImageFileDataset
from autopeft.errors import AutopeftError

FOLDER = "vtab-1k"

# Class count per task folder name, in the benchmark's order (natural, specialized, structured).
TASKS: dict[str, int] = {
    "cifar": 100,
    "caltech101": 102,
    "dtd": 47,
    "oxford_flowers102": 102,
    "oxford_iiit_pet": 37,
    "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2,
    "eurosat": 10,
    "resisc45": 45,
    "diabetic_retinopathy": 5,
    "clevr_count": 8,
    "clevr_dist": 6,
    "dmlab": 6,
    "kitti": 4,
    "dsprites_loc": 16,
    "dsprites_ori": 16,
    "smallnorb_azi": 18,
    "smallnorb_ele": 9,
}
GROUPS: dict[str, tuple[str, ...]] = {
    "natural": ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": (
        "clevr_count",
        "clevr_dist",
        "dmlab",
        "kitti",
        "dsprites_loc",
        "dsprites_ori",
        "smallnorb_azi",
        "smallnorb_ele",
    ),
}
LISTS = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")
# Tasks whose class changes under a mirror image (digits, x-position, orientation): augmentation doesn't flip them.
NO_FLIP = frozenset({"svhn", "dsprites_loc", "dsprites_ori", "smallnorb_azi"})


def find_folder(root: Path, task: str) -> Path | None:
    """`ROOT/vtab-1k/<task>`, or `ROOT/<task>` when ROOT is the vtab-1k folder; None when the lists are missing."""
    for folder in (root / FOLDER / task, root / task):
        if all((folder / name).is_file() for name in LISTS):
            return folder
    return None


def read_list(path: Path, num_classes: int) -> list[tuple[str, int]]:
    """Parse `images/<split>/NNNNNN.jpg <label>` lines (paths relative to the task folder, labels 0-based)."""
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)  # rsplit: image paths may contain spaces, labels never do
        try:
            label = int(parts[1])
        except (IndexError, ValueError):
            raise AutopeftError(f"{path}:{number}: expected '<image path> <label>', got {line.strip()!r}") from None
        if not 0 <= label < num_classes:
            raise AutopeftError(f"{path}:{number}: label {label} is outside 0-{num_classes - 1} for this task")
        samples.append((str(path.parent / parts[0]), label))
    if not samples:
        raise AutopeftError(f"{path} lists no images; restore it from the VTAB-1k release")
    missing = [p for p, _ in samples if not Path(p).is_file()]
    if missing:
        raise AutopeftError(f"{len(missing)} images listed in {path} are missing (first: {missing[0]}); restore them")
    return samples


def load_vtab(task: str, req: Request) -> DataSplits:
    """A VTAB-1k task: search on train800 / val200, final run on train800val200, test once on test.txt.

    VTAB-1k has no download: it is prepared with the VTAB/NOAH scripts (TFDS) and copied here.
    """
    num_classes = TASKS[task]
    folder = find_folder(req.root, task)
    if folder is None:
        raise AutopeftError(
            f"VTAB-1k task '{task}' not found under {req.root / FOLDER / task}: put {', '.join(LISTS)} and "
            "images/ there (the NOAH / V-PETL vtab-1k layout)"
        )
    train, val, full, test = (read_list(folder / name, num_classes) for name in LISTS)
    s, flip = req.settings, task not in NO_FLIP
    return req.splits(
        num_classes,
        train=ImageFileDataset(train, s, train=True, hflip=flip),
        val=ImageFileDataset(val, s),
        test=ImageFileDataset(test, s),
        train_full=ImageFileDataset(full, s, train=True, hflip=flip),
    )


# Each task brings its group's recipe (studies/vtab1k-<group>.yaml): the survey tunes per group, not per task.
for _group, _tasks in GROUPS.items():
    for _task in _tasks:
        register_dataset(f"vtab1k/{_task}", recipe=f"vtab1k-{_group}")(functools.partial(load_vtab, _task))
