"""DataSplits, the dataset registry and `load_dataset`, the one entry point the other rooms call."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from autopeft.data.transforms import TransformSettings
from autopeft.errors import AutopeftError

SPLITS = ("train", "val", "test", "train_full")
FOLDER_PREFIX = "imagefolder:"
# Bump when a reader changes what it yields for the same files, so caches keyed on the fingerprint go stale.
FORMAT_VERSION = 1


@dataclass
class DataSplits:
    """One dataset under its split protocol: search on train/val, final run on train_full, test once.

    Every item of every split is `(image, label)`: a float C×H×W tensor at the input size, normalised, and an int.
    """

    name: str
    num_classes: int
    train: Dataset
    val: Dataset
    test: Dataset
    train_full: Dataset
    fingerprint: str
    class_names: list[str] | None = None

    def split(self, name: str) -> Dataset:
        """The split called `name`: train, val, test or train_full."""
        if name not in SPLITS:
            raise AutopeftError(f"unknown split '{name}'; choose one of: {', '.join(SPLITS)}")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {s: len(getattr(self, s)) for s in SPLITS}


@dataclass(frozen=True)
class Request:
    """What a reader gets: where to look, how to preprocess, the split seed and whether it may download."""

    name: str
    root: Path
    settings: TransformSettings
    seed: int = 0
    download: bool | None = None

    def fingerprint(self) -> str:
        identity = dict(
            v=FORMAT_VERSION, name=self.name, root=str(self.root), seed=self.seed, **self.settings.to_dict()
        )
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:16]

    def splits(
        self,
        num_classes: int,
        train: Dataset,
        val: Dataset,
        test: Dataset,
        train_full: Dataset,
        class_names: list[str] | None = None,
    ) -> DataSplits:
        """Bundle a reader's datasets under this request's name and fingerprint."""
        return DataSplits(self.name, num_classes, train, val, test, train_full, self.fingerprint(), class_names)

    def may_download(self, host: str, port: int = 443) -> bool:
        """Whether to fetch missing files: allowed (not `download=False`, no $AUTOPEFT_OFFLINE) and `host` answers."""
        if self.download is False or os.environ.get("AUTOPEFT_OFFLINE", "") not in ("", "0"):
            return False
        return network_answers(host, port)


Reader = Callable[[Request], DataSplits]
_REGISTRY: dict[str, Reader] = {}


@dataclass(frozen=True)
class DatasetInfo:
    """What a registered dataset declares about itself beyond its reader, so no caller decides by its name.

    Attributes:
        recipe: the study recipe shipped for it (`autopeft/studies/<recipe>.yaml`), which `autopeft search
            --dataset NAME` runs; None when it has none.
        small_images: its images are small (8-32 px: digits, Fashion-MNIST, CIFAR, the mini transfer suite), so
            the bundled tiny backbone suits it; real-image datasets default to a ViT-B/16 instead.
    """

    recipe: str | None = None
    small_images: bool = False


_INFO: dict[str, DatasetInfo] = {}


def register_dataset(
    name: str, *, recipe: str | None = None, small_images: bool = False
) -> Callable[[Reader], Reader]:
    """Register a reader under `name` (as timm's `@register_model` does for models), with what it declares."""

    def wrap(reader: Reader) -> Reader:
        if name in _REGISTRY:
            raise ValueError(f"dataset '{name}' is registered twice")
        _REGISTRY[name] = reader
        _INFO[name] = DatasetInfo(recipe, small_images)
        return reader

    return wrap


def dataset_info(name: str) -> DatasetInfo | None:
    """What the registered dataset `name` declares; None for a name that is not registered (e.g. a folder path)."""
    return _INFO.get(name)


def list_datasets() -> list[str]:
    """Registered dataset names (besides these, any folder path works as an imagefolder)."""
    return sorted(_REGISTRY)


def default_root() -> Path:
    """Where datasets live unless `root` is given: $AUTOPEFT_DATA, else ~/.cache/autopeft/data."""
    env = os.environ.get("AUTOPEFT_DATA", "")
    return Path(env).expanduser().absolute() if env else Path.home() / ".cache" / "autopeft" / "data"


def network_answers(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to `host` opens within `timeout` seconds, DNS included (never hangs longer)."""
    answered: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # daemon: a stuck DNS lookup can't block exit
    thread.start()
    thread.join(timeout)
    return bool(answered)


def load_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    input_size: tuple[int, int, int] = (3, 224, 224),
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
    interpolation: str = "bicubic",
    augment: bool = False,
    seed: int = 0,
    download: bool | None = None,
) -> DataSplits:
    """Load a dataset with its split protocol and the backbone's preprocessing.

    Args:
        name: a registered name (`list_datasets()`, e.g. `digits`, `vtab1k/cifar`), `imagefolder:PATH`, or the
            path of an existing folder of class sub-folders.
        root: the data root (default `default_root()`); for `imagefolder` the folder itself.
        input_size: (channels, height, width) the backbone takes; see `data_config`.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        interpolation: resize interpolation (timm/PIL name).
        augment: augment the train and train_full splits (never val/test).
        seed: seed of the stratified splits that are drawn rather than given.
        download: None fetches missing files through torchvision when the network answers, False never does.
    """
    c, h, w = input_size
    settings = TransformSettings((int(c), int(h), int(w)), tuple(mean), tuple(std), interpolation, augment)
    reader, name, root_path = _resolve(str(name), root)
    if root_path.exists() and not root_path.is_dir():
        raise AutopeftError(f"data root {root_path} is a file; pass a folder with --data-root (or set AUTOPEFT_DATA)")
    return reader(Request(name, root_path, settings, int(seed), download))


def dataset_name(name: str, root: str | Path | None = None) -> str:
    """`name` as it means the same from any working directory and node: a registered name as it is, a folder (given
    by a path relative to here, or as `imagefolder:PATH`) as `imagefolder:` and its absolute path; AutopeftError for
    neither. Reads no image."""
    return _resolve(str(name), root)[1]


def _resolve(name: str, root: str | Path | None) -> tuple[Reader, str, Path]:
    folder_reader = _REGISTRY["imagefolder"]
    if name in _REGISTRY and name != "imagefolder":
        return _REGISTRY[name], name, Path(root).expanduser().absolute() if root else default_root()
    if name == "imagefolder" or name.startswith(FOLDER_PREFIX):
        path = name[len(FOLDER_PREFIX) :] if name.startswith(FOLDER_PREFIX) else str(root or "")
        if not path:
            raise AutopeftError("imagefolder needs a folder: pass --dataset PATH (or imagefolder:PATH)")
        folder = Path(path).expanduser().absolute()
        return folder_reader, FOLDER_PREFIX + str(folder), folder
    folder = Path(name).expanduser().absolute()
    if folder.is_dir():
        return folder_reader, FOLDER_PREFIX + str(folder), folder
    if not name.startswith("vtab1k/") and (os.sep in name or name.startswith(("~", "."))):
        raise AutopeftError(f"dataset folder {folder} does not exist; pass an existing folder of class sub-folders")
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise AutopeftError(
        f"unknown dataset '{name}'{hint}; use one of {', '.join(n for n in list_datasets() if '/' not in n)}, "
        "vtab1k/<task> (see `list_datasets()`), or the path of an existing folder of class sub-folders"
    )
