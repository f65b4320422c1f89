"""The settings of a training run (TrainConfig) and everything known about them: names, types, defaults, valid
values and how a warm-up follows a schedule's length.

No torch here: the CLI builds its help texts from these defaults before it imports anything heavy, and search
spaces and recipes are validated against them. autopeft.train runs a TrainConfig; autopeft.optim builds its
optimiser and schedule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from autopeft.errors import AutopeftError, UnknownKey

# the optimisers and schedules a run may use (autopeft.optim says what each means)
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "constant")
SGD_MOMENTUM = 0.9
# the precisions a run may compute at: auto is bf16 on a GPU that has it natively, fp16 (with a gradient scaler) on
# one that does not, fp32 on the CPU (autopeft.train.resolve_precision)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# TrainConfig fields that belong to one run, not to the recipe or space it trains: the recipe holds epochs and seed
# at its top level, a study sets the fidelity (train_fraction), the machine the rest
RUN_FIELDS = ("epochs", "seed", "train_fraction", "device", "num_workers", "eval_batch_size", "feature_cache",
              "cache_dir")


@dataclass
class TrainConfig:
    """Optimisation and fidelity settings of one run (by default AdamW, linear warm-up then cosine, as V-PEFT Bench).

    This dataclass owns the training settings: their names (`TRAINING_KEYS`, what a recipe's or a space's
    `training:` may set), their types and defaults (`defaults()`), and their validation. See autopeft.optim for
    what `optimizer` and `scheduler` mean.

    `augment` is a data setting: the caller loads the data with it (`load_dataset(augment=config.augment)`), as a
    transform of the train split; train() itself reads the data's own flag, and either one turns the feature
    cache off.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float | None = None  # None: derived from the plan's methods and the schedule (autopeft.learning_rate)
    lr_scale: float = 1.0  # multiplies the peak rate, given or derived (what the default spaces search)
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    optimizer: str = "adamw"
    scheduler: str = "cosine"
    label_smoothing: float = 0.0
    grad_clip: float = 1.0
    drop_path: float = 0.0
    augment: bool = False
    train_fraction: float = 1.0  # fidelity: share of the train split used
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    eval_batch_size: int = 256
    feature_cache: bool = True
    cache_dir: str | None = None
    # what computes the run's logits, everywhere: the cached frozen prefix, training, evaluation, `evaluate` and
    # `predict` (a recorded accuracy is reproduced at the precision it was recorded at)
    precision: str = "auto"
    # the input size the backbone runs at, in pixels (None: its pretraining size); the data is resized to it and
    # timm resamples the position embeddings (`autopeft.backbones.create_backbone`)
    img_size: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.lr is None or (self.lr > 0 and math.isfinite(self.lr)),
             f"learning rate must be > 0 (or auto), got {self.lr}"),
            (self.lr_scale > 0 and math.isfinite(self.lr_scale), f"lr_scale must be > 0, got {self.lr_scale}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (0 < self.train_fraction <= 1, f"train fraction must be in (0, 1], got {self.train_fraction}"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.optimizer in OPTIMIZERS, f"optimizer {self.optimizer!r} is not valid; use one of: "
                                           f"{', '.join(OPTIMIZERS)}"),
            (self.scheduler in SCHEDULERS, f"scheduler {self.scheduler!r} is not valid; use one of: "
                                           f"{', '.join(SCHEDULERS)}"),
            (self.img_size is None or (not isinstance(self.img_size, bool) and isinstance(self.img_size, int)
                                       and self.img_size >= 1), f"img_size must be a positive integer, got "
                                                                f"{self.img_size!r}"),
            (self.precision in PRECISIONS, f"precision {self.precision!r} is not valid; use one of: "
                                           f"{', '.join(PRECISIONS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise AutopeftError(message)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default, by name: the one place the CLI's and the trials' defaults come from."""
        return {f.name: f.default for f in fields(cls)}


# what a recipe's `training:` may set (and a space's, which may also set `epochs`, see SPACE_TRAINING_KEYS)
TRAINING_KEYS = tuple(sorted(f.name for f in fields(TrainConfig) if f.name not in RUN_FIELDS))
# a space's `training:` also names the length of its schedule, `epochs`, which its warm-up is a share of: trials
# rescale the warm-up to the search fidelity and `autopeft export` writes recipes of that length. Not `img_size`:
# the input size is the study's (its budget counts the model at it), not a trial's choice.
SPACE_TRAINING_KEYS = tuple(sorted({*TRAINING_KEYS, "epochs"} - {"img_size"}))


def value_kind(key: str) -> type:
    """The type of a training setting's values (`lr` is a float also where its default, auto, is None)."""
    return {"lr": float, "img_size": int}.get(key) or type(TrainConfig.defaults()[key])


def training_value(key: str, value: Any) -> Any:
    """One training setting as its field's type (YAML reads `1e-3` as text), or an AutopeftError naming the key.

    Only the type is checked here; TrainConfig checks the value itself (lr > 0, a known optimizer, ...). `lr` is a
    number or `auto` (or null): the rate derived from the plan and the schedule (autopeft.learning_rate).
    """
    if key == "lr" and (value is None or value == "auto"):
        return None
    if key == "img_size" and value is None:  # the backbone's pretraining size
        return None
    kind = value_kind(key)
    try:
        if kind is bool or kind is str:
            if not isinstance(value, kind):
                raise ValueError
            return value
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if kind is int:
            if not number.is_integer():
                raise ValueError
            return int(number)
        return number
    except (TypeError, ValueError):
        raise AutopeftError(f"training key '{key}' must be {kind.__name__}, got {value!r}") from None


def check_training(training: Mapping[str, Any], valid: tuple[str, ...] = TRAINING_KEYS) -> dict[str, Any]:
    """Training settings typed and validated by TrainConfig; an unknown key raises UnknownKey naming the valid ones.

    Returns the settings as their fields' types, sorted by key.
    """
    unknown = sorted(map(str, set(training) - set(valid)))
    if unknown:
        raise UnknownKey(f"unknown training key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    typed = {k: training_value(k, v) for k, v in sorted(training.items())}
    TrainConfig(**typed)
    return typed


# an epoch takes at least this many optimiser steps: a smaller batch where `batch_size` would give fewer (64 on 200
# images would be 3 full batches; fitted, 6 of 33)
MIN_STEPS_PER_EPOCH = 6


def fitted_batch(batch_size: int, train_size: int) -> int:
    """The batch a run on `train_size` images trains with: `batch_size`, or the largest batch that still gives
    MIN_STEPS_PER_EPOCH full batches per epoch when it is smaller (at least 1)."""
    return max(1, min(batch_size, train_size // MIN_STEPS_PER_EPOCH))


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    """Optimiser steps of one epoch over `train_size` images: its full batches of the fitted batch (the partial
    last batch is dropped, a few images that a fresh order per epoch brings back in other epochs)."""
    return max(train_size // fitted_batch(batch_size, train_size), 1)


def total_steps(train_size: int, batch_size: int, epochs: int) -> int:
    """Optimiser steps of a whole run."""
    return steps_per_epoch(train_size, batch_size) * epochs


def rescale_warmup(training: Mapping[str, Any], from_epochs: float | None, to_epochs: float) -> dict[str, Any]:
    """`training` for a schedule of `to_epochs` instead of `from_epochs`: the warm-up keeps its share of it.

    10 warm-up epochs of 100 become 1 of 10, for a trial at the search fidelity and for a recipe trained longer or
    shorter; a warm-up left to its default, or a schedule of unknown length (`from_epochs` None), is left alone.
    """
    out = dict(training)
    if "warmup_epochs" in out and from_epochs and to_epochs != from_epochs:
        out["warmup_epochs"] = float(out["warmup_epochs"]) * float(to_epochs) / float(from_epochs)
    return out


def fitted_config(config: TrainConfig, backbone: str, train_size: int) -> tuple[TrainConfig, list[str]]:
    """`config` as a run on `train_size` images of `backbone` trains it, and a note for each change: the batch
    fitted to the split (`fitted_batch`: at least MIN_STEPS_PER_EPOCH full batches per epoch) and drop-path no
    higher than the backbone was pretrained with, where that is known (`pretrained_drop_path`: frozen blocks never
    learned to work with their branches dropped)."""
    from autopeft.backbones import pretrained_drop_path

    notes = []
    batch = fitted_batch(config.batch_size, train_size)
    if batch != config.batch_size:
        notes.append(f"batch {batch} instead of {config.batch_size}: {train_size} train images give at least "
                     f"{MIN_STEPS_PER_EPOCH} steps per epoch")
    drop = config.drop_path
    pretrained = pretrained_drop_path(backbone)
    if pretrained is not None and drop > pretrained:
        notes.append(f"drop-path {pretrained:g} instead of {drop:g}: {backbone} was pretrained with {pretrained:g}")
        drop = pretrained
    return replace(config, batch_size=batch, drop_path=drop), notes
