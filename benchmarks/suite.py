"""The benchmark suites: which tasks, backbone, budgets, seeds and fidelity each mode runs, and their data checks.

- `mini` (CPU): the bundled `autopeft_tiny_vit` (pretrained on Fashion-MNIST train images) on the mini transfer
  suite of `autopeft.data.synthetic` plus `digits`. `--full`: all 7 tasks × budgets 0.5 / 1 / 2 % × seeds 0-2, 30
  epochs per full-fidelity run, a 4-point learning-rate sweep (3e-4 … 1e-2) for the hand-picked methods. `--quick`:
  one few-shot task (`fmnist_count_fs`) at 0.5 %, seed 0, 5 epochs, a 2-point sweep (3e-3, 1e-2): small-sample, a
  smoke-scale measurement that fits 15 minutes on 2 loaded cores (a second task does not: the engine's per-trial
  overhead dominates); of the references only linear probing (full fine-tuning is the
  costliest run; `--full` has it). `--tasks` picks any of the suite's tasks in either mode.
- `vtab1k` (GPU): `vit_base_patch16_224` on the 19 VTAB-1k tasks (NOAH / V-PETL layout under `--data-root`), the
  survey's protocol (100 epochs at full fidelity); `--quick` runs 2 tasks, one seed, 10 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from autopeft.errors import AutopeftError

MINI_TASKS = ("digits", "mnist5k", "fmnist_rot", "fmnist_loc", "fmnist_count", "mnist5k_fs", "fmnist_count_fs")


@dataclass(frozen=True)
class Mode:
    """One suite in one mode: the grid to run and the fidelity of every run."""

    suite: str
    mode: str
    backbone: str
    tasks: tuple[str, ...]
    budgets: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int
    lrs: tuple[float, ...]
    grace_epochs: int
    reduction_factor: int
    speed_trials: int
    speed_epochs: int
    speed_task: str
    references: tuple[str, ...] = ("full", "linear")


def _vtab_tasks() -> tuple[str, ...]:
    from autopeft.data import VTAB_GROUPS

    return tuple(f"vtab1k/{t}" for group in VTAB_GROUPS.values() for t in group)


def get_mode(suite: str, quick: bool) -> Mode:
    """The grid of `suite` (mini | vtab1k) in quick or full mode."""
    if suite == "mini":
        if quick:
            return Mode("mini", "quick", "autopeft_tiny_vit", ("fmnist_count_fs",), ("0.5%",), (0,),
                        epochs=5, lrs=(3e-3, 1e-2), grace_epochs=2, reduction_factor=2,
                        speed_trials=2, speed_epochs=1, speed_task="fmnist_count_fs", references=("linear",))
        return Mode("mini", "full", "autopeft_tiny_vit", MINI_TASKS, ("0.5%", "1%", "2%"), (0, 1, 2),
                    epochs=30, lrs=(3e-4, 1e-3, 3e-3, 1e-2), grace_epochs=4, reduction_factor=2,
                    speed_trials=8, speed_epochs=5, speed_task="mnist5k")
    if suite == "vtab1k":
        tasks = _vtab_tasks()
        if quick:
            return Mode("vtab1k", "quick", "vit_base_patch16_224", ("vtab1k/cifar", "vtab1k/dsprites_loc"),
                        ("0.5%",), (0,), epochs=10, lrs=(1e-3, 1e-2), grace_epochs=2, reduction_factor=2,
                        speed_trials=4, speed_epochs=1, speed_task="vtab1k/cifar")
        return Mode("vtab1k", "full", "vit_base_patch16_224", tasks, ("0.5%", "1%", "2%"), (0, 1, 2),
                    epochs=100, lrs=(1e-3, 3e-3, 1e-2), grace_epochs=10, reduction_factor=3,
                    speed_trials=8, speed_epochs=2, speed_task="vtab1k/cifar")
    raise AutopeftError(f"unknown suite '{suite}'; choose mini or vtab1k")


def check_data(mode: Mode, data_root: str | None) -> None:
    """Raise AutopeftError (one line) unless every task of `mode` can be read: cheap checks, nothing written."""
    root = Path(data_root).expanduser() if data_root else None
    if root is not None and not root.is_dir():
        raise AutopeftError(f"--data-root {root} is not a folder")
    if mode.suite == "vtab1k":
        from autopeft.data.vtab import find_folder

        if root is None:
            raise AutopeftError("--suite vtab1k needs --data-root DIR holding vtab-1k/<task>/{train800,val200,"
                                "train800val200,test}.txt and images/ (the NOAH / V-PETL layout)")
        missing = [t for t in mode.tasks if find_folder(root, t.split("/", 1)[1]) is None]
        if missing:
            raise AutopeftError(f"{len(missing)} VTAB-1k task(s) missing under {root} (first: {missing[0]}); put "
                                "vtab-1k/<task>/{train800,val200,train800val200,test}.txt and images/ there")
        return
    from autopeft.data import data_config, load_dataset

    for task in mode.tasks:  # in-memory tasks: loading is cheap (seconds) and proves files and packages are there
        load_dataset(task, data_root, download=False, **data_config(mode.backbone))
