"""A dataset that fails on purpose, for the reliability tests: `flaky` is the digits dataset, except that each time a
trial loads it, it takes the next behaviour from `ROOT/script.json` (the data root the search passes to every
trial): `ok`, `raise` (an exception in the data pipeline), `nan` (images of NaN: the loss becomes NaN) or `oom`
(the exception CUDA raises when memory runs out).

Ray runs trials in worker processes: the search's Ray instance imports this module in each of them through
`runtime_env={"worker_process_setup_hook": "flaky_data.register"}`, with this folder on their PYTHONPATH.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from autopeft.data import DataSplits, Request, load_dataset, register_dataset
from autopeft.data.base import list_datasets

NAME = "flaky"
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 15.78 GiB total capacity) [simulated]"


class Faulty(Dataset):
    """Another dataset's items, spoiled as `behaviour` says."""

    def __init__(self, base: Dataset, behaviour: str) -> None:
        self.base, self.behaviour = base, behaviour

    @property
    def targets(self) -> list[int]:
        return list(self.base.targets)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index]
        if self.behaviour == "raise":
            raise ValueError("simulated failure in the data pipeline")
        if self.behaviour == "oom":
            raise torch.OutOfMemoryError(OOM_MESSAGE)
        if self.behaviour == "nan":
            x = torch.full_like(x, float("nan"))
        return x, y


def _claim(root: Path) -> int:
    """The next unused index of the script, claimed atomically (trials load the dataset concurrently)."""
    i = 0
    while True:
        try:
            (root / f"claim-{i}").mkdir()
            return i
        except FileExistsError:
            i += 1


def load_flaky(req: Request) -> DataSplits:
    script = json.loads((req.root / "script.json").read_text())
    index = _claim(req.root)
    behaviour = script[index] if index < len(script) else "ok"
    s = req.settings
    base = load_dataset("digits", seed=req.seed, input_size=s.input_size, mean=s.mean, std=s.std,
                        interpolation=s.interpolation)
    if behaviour == "ok":
        return base
    # its own fingerprint: the feature cache must not serve a spoiled trial the clean features of another
    return DataSplits(f"{NAME}-{behaviour}", base.num_classes, Faulty(base.train, behaviour), base.val, base.test,
                      Faulty(base.train_full, behaviour), f"{base.fingerprint}-{behaviour}-{index}")


def register() -> None:
    """Register `flaky` (idempotent: the driver and each worker call it)."""
    if NAME not in list_datasets():
        register_dataset(NAME)(load_flaky)
