"""Recipe: an exported, self-contained training run (backbone, data protocol, plan, hyper-parameters, provenance).

`autopeft export` writes one from a study's trial; `autopeft train --config` trains it; every run directory keeps the
recipe it ran. Plain YAML with sorted keys, read with `yaml.safe_load`, versioned:

    version: 1
    backbone: autopeft_tiny_vit         # timm name
    weights: null                       # local weights file (null: the backbone's own pretrained weights)
    dataset: digits                     # registered dataset or folder
    data_root: null                     # where datasets live (null: $AUTOPEFT_DATA or ~/.cache/autopeft/data)
    num_classes: 10
    protocol: final                     # final: train on train_full (train+val), test once; search: train/val, test
    split_seed: 0                       # seed of the drawn splits: the search's, so the test set stays unseen
    seed: 0                             # training seed (initialisation, batch order)
    epochs: 100
    training: {batch_size: 64, lr: 0.003, optimizer: adamw, scheduler: cosine, warmup_epochs: 10, ...}
    plan: {version: 1, blocks: {...}, global: [...]}
    provenance: {study: digits, trial: 7, val_acc: 0.94, peft_params: 4608, date: ..., versions: {...}}
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from autopeft.errors import AutopeftError
from autopeft.plan import PeftPlan
from autopeft.train_config import TRAINING_KEYS, TrainConfig, check_training, rescale_warmup
from autopeft.yamlfile import read_yaml

if TYPE_CHECKING:
    from autopeft.data import DataSplits
    from autopeft.train import TrainResult

__all__ = ["PROTOCOLS", "RECIPE_VERSION", "TRAINING_KEYS", "Recipe", "load_data", "train_recipe"]

RECIPE_VERSION = 1
PROTOCOLS = {"final": ("train_full", None), "search": ("train", "val")}  # protocol -> (train split, eval split)
_KEYS = ("version", "backbone", "weights", "dataset", "data_root", "num_classes", "protocol", "split_seed", "seed",
         "epochs", "training", "plan", "provenance")
_REQUIRED = ("version", "backbone", "dataset", "epochs", "plan")


@dataclass(frozen=True)
class Recipe:
    """One training run, fully specified.

    Attributes:
        backbone: timm model name.
        dataset: registered dataset name or folder.
        plan: the PEFT plan.
        epochs: training epochs; `training["warmup_epochs"]` is relative to them.
        weights: local weights file of the backbone (None: timm's pretrained weights).
        data_root: where the dataset lives (None: the default root).
        num_classes: classes the head predicts (checked against the dataset when given).
        protocol: `final` (train on train_full, no val curve, test once) or `search` (train on train, val curve).
        split_seed: seed of drawn splits (the search's, so a final run's test set was never searched on).
        seed: training seed.
        training: training settings (autopeft.train_config.TRAINING_KEYS); absent ones take TrainConfig's defaults.
        provenance: where the recipe came from (study, trial, val accuracy, params, date, versions, notes).
    """

    backbone: str
    dataset: str
    plan: PeftPlan
    epochs: int
    weights: str | None = None
    data_root: str | None = None
    num_classes: int | None = None
    protocol: str = "final"
    split_seed: int = 0
    seed: int = 0
    training: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise AutopeftError(f"protocol '{self.protocol}' is not valid; use one of: {', '.join(PROTOCOLS)}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise AutopeftError(f"epochs must be >= 1 (an integer), got {self.epochs!r}")
        for name in ("seed", "split_seed"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise AutopeftError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise AutopeftError(f"num_classes must be an integer >= 1, got {self.num_classes!r}")
        object.__setattr__(self, "training", check_training(self.training))  # types and values (lr > 0, …)

    # -- training ---------------------------------------------------------------------------------------------------

    @property
    def splits(self) -> tuple[str, str | None]:
        """(train split, eval split or None) of the protocol."""
        return PROTOCOLS[self.protocol]

    @property
    def augment(self) -> bool:
        return self.train_config().augment

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The TrainConfig of this recipe; `overrides` sets run-only fields (device, feature_cache, cache_dir)."""
        try:
            return TrainConfig(**self.training, epochs=self.epochs, seed=self.seed, **overrides)
        except TypeError as exc:
            raise AutopeftError(f"bad training settings: {exc}") from None

    def with_epochs(self, epochs: int) -> Recipe:
        """The same schedule stretched to `epochs`: warm-up keeps its share (10 of 100 → 1 of 10), as trials do."""
        training = rescale_warmup(self.training, self.epochs, epochs)
        return dataclasses.replace(self, epochs=int(epochs), training=training)

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    @property
    def img_size(self) -> int | None:
        """The input size the backbone runs at (`training.img_size`; None: its pretraining size)."""
        return self.training.get("img_size")

    def check(self) -> int:
        """Validate the plan against the backbone; return its trainable parameters (head excluded)."""
        from autopeft.backbones import backbone_spec

        return self.plan.count(backbone_spec(self.backbone, self.img_size))

    # -- serialisation ----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _KEYS if k not in ("version", "plan")}
        training = {k: "auto" if k == "lr" and v is None else v for k, v in self.training.items()}
        out.update(version=RECIPE_VERSION, plan=self.plan.to_dict(), training=training,
                   provenance=_plain(self.provenance))
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        """Build and validate a recipe; errors name `where` (the file) and the offending key."""
        if not isinstance(data, dict):
            raise AutopeftError(f"{where}: a recipe must be a mapping with keys {', '.join(_REQUIRED)}, …")
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            hint = " (a study recipe? pass it to `autopeft search --recipe`)" if {"budget", "space"} & set(data) else ""
            raise AutopeftError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}{hint}; valid keys: "
                                f"{', '.join(sorted(_KEYS))}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise AutopeftError(f"{where}: missing key(s) {', '.join(missing)} (export a recipe with `autopeft "
                                "export`)")
        if data["version"] != RECIPE_VERSION:
            raise AutopeftError(f"{where}: key 'version' is {data['version']!r}; this autopeft reads recipe version "
                                f"{RECIPE_VERSION}")
        for key in ("training", "provenance"):
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise AutopeftError(f"{where}: key '{key}' must be a mapping")
        try:
            plan = PeftPlan.from_dict(data["plan"])
            kwargs = {k: data[k] for k in _KEYS if k in data and k not in ("version", "plan")}
            kwargs["training"] = dict(data.get("training") or {})
            kwargs["provenance"] = dict(data.get("provenance") or {})
            for key in ("backbone", "dataset"):
                kwargs[key] = str(kwargs[key])
            recipe = cls(plan=plan, **kwargs)
            recipe.check()
        except AutopeftError as exc:
            raise type(exc)(f"{where}: {exc}") from None  # the same kind (UnknownKey, …), naming the file
        return recipe

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe file; relative `weights` and `data_root` paths are taken from the file's folder."""
        path = Path(path)
        data = read_yaml(path, "recipe file")
        if isinstance(data, dict):
            for key in ("weights", "data_root"):
                value = data.get(key)
                if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                    data[key] = str((path.parent / Path(value).expanduser()).absolute())
        return cls.from_dict(data, where=str(path))

    def save(self, path: str | Path) -> None:
        """Write atomically: a reader never sees half a recipe, a failure leaves no file."""
        write_text_atomic(Path(path), self.to_yaml())


def load_data(recipe: Recipe, data_root: str | None = None) -> DataSplits:
    """The recipe's dataset under its split seed and the backbone's preprocessing (no augmentation of eval splits)."""
    from autopeft.data import data_config, load_dataset

    data = load_dataset(recipe.dataset, data_root or recipe.data_root, augment=recipe.augment,
                        seed=recipe.split_seed, **data_config(recipe.backbone, recipe.img_size))
    if recipe.num_classes is not None and data.num_classes != recipe.num_classes:
        raise AutopeftError(f"dataset {data.name} has {data.num_classes} classes but the recipe was made for "
                            f"{recipe.num_classes}; check --data-root and the recipe's dataset")
    return data


def train_recipe(recipe: Recipe, data: DataSplits, *, weights: str | None = None, test: bool = True,
                 report: Callable[[dict], None] | None = None, on_step: Callable[..., None] | None = None,
                 **run_options: Any) -> TrainResult:
    """Train `recipe` with autopeft.train.train (the function every search trial runs), then test once.

    Args:
        recipe: what to train.
        data: its DataSplits (`load_data`).
        weights: a weights file replacing the recipe's (same backbone, another location).
        test: evaluate the test split once after the last epoch (False while selecting, which must not see it).
        report: per-epoch callback (see autopeft.train.train).
        on_step: per-step callback.
        run_options: TrainConfig fields that do not change the result's meaning: device, feature_cache, cache_dir.
    """
    from autopeft.train import train

    train_split, eval_split = recipe.splits
    return train(recipe.backbone, recipe.plan, data, recipe.train_config(**run_options),
                 weights=weights or recipe.weights, train_split=train_split, eval_split=eval_split, test=test,
                 report=report, on_step=on_step)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _plain(value: Any) -> Any:
    """Provenance as YAML-safe plain data (tuples to lists, NaN to None, numpy scalars to Python)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    for kind in (bool, int, float):  # exact types: safe_dump refuses subclasses such as torch's version string
        if isinstance(value, kind):
            return kind(value)
    return None if value is None else str(value)
