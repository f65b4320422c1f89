"""A Ray worker runs trial after trial: a failed trial gives its memory back before its failure is recorded, and a
CUDA error that breaks the process's context ends the worker rather than failing every later trial there."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import optuna
import pytest

from autopeft.backbones import backbone_spec
from autopeft.budget import parse_budget
from autopeft.search import trainable
from autopeft.space import load_space

VIT = "autopeft_test_vit"


def _trial_config() -> dict:
    from autopeft.search.engine import SamplePlan

    spec = backbone_spec(VIT)
    return SamplePlan(load_space("lora"), spec, parse_budget("5%", spec), 1)(optuna.create_study().ask())


def test_a_failed_trials_model_is_freed_before_its_failure_is_recorded(tmp_path, monkeypatch) -> None:
    from ray import tune
    from safetensors.torch import save_file

    import autopeft.train as train_module
    from autopeft.backbones import create_backbone

    models: list[weakref.ref] = []
    build = train_module.build_model

    def recording_build(*args, **kwargs):
        model, spec = build(*args, **kwargs)
        models.append(weakref.ref(model))
        return model, spec

    alive_at_failure: list[bool] = []

    def report(metrics: dict, checkpoint=None) -> None:
        if "fail_reason" in metrics:
            alive_at_failure.append(models[-1]() is not None)
            return
        # the first epoch's report fails, as an out-of-memory error mid-training would: model, optimiser and
        # autograd graph are all alive in the frames of the exception's traceback
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module, "build_model", recording_build)
    monkeypatch.setattr(tune, "report", report)
    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    save_file(create_backbone(VIT).state_dict(), str(tmp_path / "w.safetensors"))
    gc.disable()  # the release must not depend on a collection that happens to run by itself
    try:
        trainable.run_trial(_trial_config(), trainable.TrialSettings(
            dataset="digits", backbone=VIT, epochs=1, weights=str(tmp_path / "w.safetensors")))
    finally:
        gc.enable()
    assert alive_at_failure == [False]
    assert not trainable._POISONED  # out of memory leaves the context usable


@pytest.mark.parametrize("message,fatal", [
    ("CUDA error: an illegal memory access was encountered", True),
    ("CUDA error: device-side assert triggered", True),
    ("CUDA error: unspecified launch failure", True),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("mat1 and mat2 shapes cannot be multiplied", False),
])
def test_which_errors_break_the_cuda_context(message, fatal) -> None:
    assert trainable._poisons_context(RuntimeError(message)) is fatal


def test_a_broken_worker_ends_before_its_next_trial() -> None:
    """After a context-breaking failure the worker's next trial ends the process (Ray starts a fresh worker and
    re-runs the trial there, as after a lost worker) instead of failing it on the broken context."""
    code = ("from autopeft.search import trainable\n"
            "trainable._POISONED.append('CUDA error: an illegal memory access was encountered')\n"
            "trainable.run_trial({'autopeft': {}}, None)\n"
            "print('ran on')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and "ran on" not in done.stdout
