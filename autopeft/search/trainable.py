"""The Ray Tune trainable: one trial = one call of autopeft.train.train with a per-epoch `tune.report`.

A trial that has diverged after an epoch before its last (`diverged`: two epochs at chance, its train loss not
below a uniform guess's) stops at once, whatever ASHA would decide, and is recorded with a reason that
begins `diverged` (the searcher keeps it as a stopped trial, which TPE learns from): the epochs it had left go to
other trials. The driver decides whether trials stop so, for every node (`TrialSettings.stop_diverged`): not without
early stopping, nor with `AUTOPEFT_STOP_DIVERGED=0` in the search command's environment (the test suite sets it: its
random-weight backbones' trials are often at chance).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autopeft.errors import AutopeftError

if TYPE_CHECKING:
    from autopeft.train_config import TrainConfig


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a study shares (shipped to the workers once)."""

    dataset: str
    backbone: str
    epochs: int
    weights: str | None = None
    data_root: str | None = None
    seed: int = 0
    checkpoint_every: int = 0  # a trial's state goes with every k-th epoch's report (0: none)
    precision: str = "auto"  # what the trials compute at (autopeft.train.resolve_precision)
    # `auto`: the GPU Ray gave the trial (it sets CUDA_VISIBLE_DEVICES to it), else the CPU; `cpu` for trials that
    # asked for no GPU, which must not take one nobody reserved for them
    device: str = "auto"
    num_workers: int = 0  # DataLoader processes preparing the trial's images (autopeft.train: 0, in its thread)
    img_size: int | None = None  # the study's input size (None: the backbone's pretraining size)
    # a trial that has diverged stops at once (`diverged`); the driver decides it for every node
    # (autopeft.search.engine.trial_settings: off without early stopping or with AUTOPEFT_STOP_DIVERGED=0)
    stop_diverged: bool = True


STATE_FILE = "train_state.pt"
CHANCE_Z = 2.33  # an at-chance classifier's accuracy on n val images stays under 1/C + z·sd 99 % of the time
# a train loss above this share of ln C has not fallen: a head that has learnt only the class prior sits a little
# under ln C, a run that learns well under it after one epoch
FALLEN = 0.95


class Diverged(AutopeftError):
    """A trial's training has collapsed (`diverged`)."""


def chance_level(classes: int, val_size: int) -> float:
    """The highest val accuracy that is still at chance: 1/C plus CHANCE_Z binomial standard deviations of an
    at-chance classifier on `val_size` images (0.149 for 10 classes and 200 images)."""
    p = 1.0 / max(classes, 1)
    return p + CHANCE_Z * math.sqrt(p * (1 - p) / max(val_size, 1))


DIVERGED = "diverged"  # the start of the reason a trial that collapsed reports (`diverged`)


def diverged(curve: list[float], train_loss: float, classes: int, val_size: int) -> str | None:
    """Why a trial whose val accuracy after each epoch so far is `curve`, and whose last epoch's mean train loss is
    `train_loss`, has diverged, or None: its last two epochs are at chance (`chance_level`) and its train loss has
    not fallen (above FALLEN × ln C, ln C being the loss of a uniform guess; NaN too).

    Two epochs, not one: on the standard grid a first epoch (the warm-up's) at chance with a train loss above ln C
    was common in runs that went on to 0.3-0.7 (BENCHMARKS.md "Rate cliff: per-method rates"); the loss as well as
    the accuracy: a collapsed run, which predicts one class, is both at chance and no better than a guess."""
    if classes < 2 or len(curve) < 2:
        return None
    level = chance_level(classes, val_size)
    if max(curve[-2:]) <= level and not train_loss < FALLEN * math.log(classes):
        return (f"{DIVERGED}: val accuracy {curve[-2]:.3f}, {curve[-1]:.3f} in epochs {len(curve) - 1}-{len(curve)} is "
                f"at chance (≤ {level:.3f} for {classes} classes and {val_size} val images) and the mean train loss "
                f"{train_loss:.3f} has not fallen below {FALLEN:g} × ln {classes}; lower lr_scale")
    return None


def trial_config(hparams: dict[str, Any], epochs: int, seed: int, precision: str | None = None,
                 **machine: Any) -> TrainConfig:
    """The TrainConfig of a trial from its hyper-parameters at the study's fidelity.

    `hparams` are what `sample_hparams` returns: the space's fixed training settings and the sampled ones, under
    the keys of `SPACE_TRAINING_KEYS` (checked when the space was read); keys it leaves out take TrainConfig's
    defaults. `epochs` and `seed` are the study's, and the space's warm-up keeps its share of the space's schedule
    (`epochs` in the space: 10 of 100 warm-up epochs are 1 of a 10-epoch trial). `precision`, the study's, holds
    over the space's; `machine`: where the trial runs (TrainConfig's `device`, `num_workers`).
    """
    from autopeft.train_config import SPACE_TRAINING_KEYS, TrainConfig, check_training, rescale_warmup

    training = rescale_warmup(hparams, hparams.get("epochs"), epochs)
    training.pop("epochs", None)
    if precision is not None:
        training["precision"] = precision
    return TrainConfig(**check_training(training, SPACE_TRAINING_KEYS), epochs=epochs, seed=seed, **machine)


def _failure(exc: BaseException) -> str:
    if isinstance(exc, AutopeftError):
        return str(exc)
    if "out of memory" in str(exc).lower():
        return f"out of memory: {str(exc).splitlines()[0][:200]}; lower the batch size or run fewer trials per GPU"
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})" if frame else ""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}{where}"


# failures of this worker process's trials that left its CUDA context unusable (`_poisons_context`)
_POISONED: list[str] = []
# what CUDA says of an error that leaves the context unusable for the rest of the process (an illegal address, a
# device-side assert, a launch failure); out of memory is not one of them
_FATAL_CUDA = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
               "illegal instruction", "an illegal", "uncorrectable ecc", "cuda error: unknown error")


def _poisons_context(exc: BaseException) -> bool:
    """Whether `exc` is a CUDA error after which no kernel runs again in this process."""
    text = str(exc).lower()
    return "cuda" in text and any(marker in text for marker in _FATAL_CUDA)


def _gpus() -> list[str]:
    """The GPUs Ray gave this trial (its CUDA_VISIBLE_DEVICES; none outside Ray or for a CPU trial)."""
    try:
        import ray

        # outside Ray (a test, a debugger) asking would start a local Ray instance
        return [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
    except Exception:  # noqa: BLE001  outside Ray
        return []


def _node() -> str:
    """The Ray node running this trial (several nodes may share one IP address)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()[:12] if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001  outside Ray
        return ""


def run_trial(config: dict, settings: TrialSettings) -> None:
    """Train the trial's plan, reporting after every epoch; failures are reported, not raised.

    A failure becomes a final report carrying `fail_reason` (and no `val_acc`, so the scheduler ignores it); the
    searcher records the trial as FAIL with that reason and the study goes on. A trial that has diverged after an
    epoch before its last (`diverged`) fails so at once, with that epoch in its curve. A config with a `cv` entry
    ({folds, fold, seed}) is a cross-validation fold run: it trains on the other folds of train+val and reports
    the held-out fold as `val_acc` (autopeft.data.folds).
    """
    from ray import tune

    from autopeft.data import data_config, load_dataset
    from autopeft.plan import PeftPlan
    from autopeft.train import num_samples, train

    if _POISONED:  # a CUDA error of an earlier trial broke this process: end it, Ray re-runs the trial elsewhere
        os._exit(3)
    _release_memory()  # what the worker's previous trial left
    info = config["autopeft"]
    start = time.perf_counter()
    curve: list[float] = []
    # `attempt`: this run of the trial (Ray re-runs a trial whose worker was lost): the epoch cap counts each run
    base = {"peft_params": info["peft_params"], "overhead": info.get("overhead", 0.0), "node": _node(),
            "gpus": _gpus(), "attempt": uuid.uuid4().hex[:12]}
    resume = _last_state()
    if resume is not None:  # a re-run after a lost worker: on from the trial's last checkpoint
        curve = [float(h["val_acc"]) for h in resume["history"]]
        base["resumed_from"] = int(resume["epoch"])
    try:
        plan = PeftPlan.from_dict(info["plan"])
        cfg = trial_config(info.get("hparams", {}), settings.epochs, settings.seed, settings.precision,
                           device=settings.device, num_workers=settings.num_workers, img_size=settings.img_size)
        data = load_dataset(settings.dataset, settings.data_root, augment=cfg.augment, seed=settings.seed,
                            **data_config(settings.backbone, settings.img_size))
        if info.get("cv"):
            from autopeft.data.folds import cv_splits

            cv = info["cv"]
            data = cv_splits(data, int(cv["folds"]), int(cv["fold"]), int(cv["seed"]))

        classes, val_size = data.num_classes, num_samples(data.split("val"))
        stop_diverged = settings.stop_diverged

        def report(m: dict) -> None:
            curve.append(float(m["val_acc"]))
            # at the last epoch there are no epochs left to save: the trial ends with its accuracy
            reason = diverged(curve, float(m["train_loss"]), classes, val_size) if stop_diverged else None
            if reason and m["epoch"] < settings.epochs:
                raise Diverged(reason)
            metrics = {**base, "val_acc": m["val_acc"], "val_loss": m["val_loss"], "train_loss": m["train_loss"],
                       "epoch": m["epoch"], "curve": list(curve), "seconds": time.perf_counter() - start}
            if "state" not in m:
                tune.report(metrics)
                return
            import torch

            with tempfile.TemporaryDirectory(prefix="autopeft-state-") as folder:  # Ray copies it to its storage
                torch.save(m["state"], Path(folder) / STATE_FILE)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

        train(settings.backbone, plan, data, cfg, weights=settings.weights, report=report, resume=resume,
              checkpoint_every=settings.checkpoint_every)
    except Exception as exc:  # noqa: BLE001  a bad trial must never end the study
        failure, poisoned = _failure(exc), _poisons_context(exc)
    else:
        return
    # Out of the `except` block: the exception is gone, and with its traceback the frames that held the model, its
    # optimiser and graph, so that their memory is back before the failure is recorded and a neighbour goes on
    _release_memory()
    tune.report({**base, "fail_reason": failure, "epoch": len(curve), "curve": list(curve),
                 "seconds": time.perf_counter() - start})
    if poisoned:
        _POISONED.append(failure)  # this worker's CUDA context is unusable: its next trial must not run here
    # Not in a `finally`: a trial ASHA stops ends inside its report (Ray raises SystemExit there) while Tune waits
    # 2 s (TUNE_FUNCTION_THREAD_TIMEOUT_S) for the thread before it reuses the worker; a garbage collection in that
    # window, slow on a loaded machine, made Tune give up on the worker. The next trial collects first instead.


def _last_state() -> dict | None:
    """The train state of the trial's last checkpoint (Ray Tune hands it to a re-run), else None."""
    from ray import tune

    with warnings.catch_warnings():  # run_trial called outside a Tuner (a test, a debugger): no checkpoint
        warnings.filterwarnings("ignore", message=".*get_checkpoint.*only be called inside")
        checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    import torch

    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, weights_only=True)


def _release_memory() -> None:
    """The worker process runs trial after trial (Ray reuses it): hand back what the last one held, on the GPU as
    well (a trial that ran out of memory leaves cached blocks a GPU-sharing neighbour may need)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
