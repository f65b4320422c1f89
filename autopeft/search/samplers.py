"""The search's Optuna samplers: `make_sampler` by name, and the engine's TPE, which learns from the plan each trial
trained (`RepairedTPE`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import optuna
from optuna.trial import FrozenTrial

from autopeft.errors import AutopeftError
from autopeft.space import repaired_params

T = TypeVar("T")


def _quiet(factory: Callable[..., T], **kwargs: Any) -> T:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return factory(**kwargs)


# TPE's random start: this many trials of its own before it models the space (enqueued trials do not count)
TPE_STARTUP = 4
# the engine's TPE; group=True: TPE models each conditional sub-space (a method's options) on the trials that used it
TPE_OPTIONS: dict[str, Any] = {"multivariate": True, "group": True, "constant_liar": True}


class RepairedTPE(optuna.samplers.TPESampler):
    """TPE that models every trial by the plan it trained: where the budget repair changed a draw (a smaller rank,
    a block switched off), the sampler sees the repaired values (`repaired_params`), not the drawn ones, so the
    density of what worked sits on what actually ran.

    TPE reads a trial's parameters through `_get_params` (Optuna >= 5, pinned in pyproject.toml); a test checks
    that it still does."""

    def _get_params(self, trial: FrozenTrial, study: optuna.Study) -> dict[str, Any]:
        return repaired_params(trial, super()._get_params(trial, study))


def make_sampler(name: str, seed: int, enqueued: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler `name`; `enqueued` trials (baselines, warm start) come first and are not part of TPE's random
    start, which Optuna would otherwise count them in."""
    factories = {
        "tpe": lambda: _quiet(RepairedTPE, seed=seed, n_startup_trials=TPE_STARTUP + enqueued, **TPE_OPTIONS),
        # one joint estimator over the parameters every trial has (method, rates, weight decay), the conditional
        # ones (a method's sizes and places) each on its own: on PETL_Vision's table it needs 0.65 of the
        # evaluations the grouped default does, on the standard grid it tests 0.6 points below it (BENCHMARKS.md)
        "tpe-nogroup": lambda: _quiet(RepairedTPE, seed=seed, n_startup_trials=TPE_STARTUP + enqueued,
                                      **{**TPE_OPTIONS, "group": False}),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    if name not in factories:
        raise AutopeftError(f"unknown sampler '{name}'; choose one of: {', '.join(factories)}")
    return factories[name]()
