"""The optimiser and learning-rate schedule of a training run, built from its TrainConfig.

Two optimisers and two schedules, both schedules after the same linear warm-up (from 1 % of the peak lr):

- `adamw`: AdamW, as V-PEFT Bench trains (the default).
- `sgd`: SGD with momentum 0.9, Nesterov off. Its weight decay is torch's coupled L2 term, AdamW's is decoupled, so
  the same `weight_decay` value is not the same regularisation under both.
- `cosine`: a cosine from the peak down to 1e-3 of it, reaching the floor at the last step (the default).
- `constant`: the peak after the warm-up, flat to the end.

Each method of a plan trains in its own parameter groups at its own peak rate, the head in its own at the linear
method's (autopeft.learning_rate.peak_rates); one schedule scales every group's rate alike (`GroupSchedule`).
Weight decay applies to matrices only; biases, norms and scales (1-d parameters) are not decayed, under both
optimisers: each rate's parameters are split into a decayed and an undecayed group.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from timm.scheduler import CosineLRScheduler

from autopeft.train_config import OPTIMIZERS, SCHEDULERS, SGD_MOMENTUM  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from autopeft.train_config import TrainConfig


def _peak(config: TrainConfig) -> float:
    if config.lr is None:  # `auto` is resolved where the plan and the data are known (autopeft.train.set_up)
        raise ValueError("the optimiser needs a resolved learning rate; autopeft.learning_rate.peak_rates gives it")
    return config.lr


def rate_groups(model: torch.nn.Module, owners: Mapping[str, str], rates: Mapping[str, float]
                ) -> dict[str, tuple[list[torch.nn.Parameter], float]]:
    """The trainable parameters of `model` by rate group, each with its peak rate: a head parameter in the head's
    group, another in its owning method's (`owners`: name -> method, as `PeftPlan.apply` records them). A
    trainable parameter no method owns, or one of a method without a rate, trains at the lowest rate of `rates`."""
    from autopeft.backbones import is_head_param
    from autopeft.learning_rate import HEAD

    groups: dict[str, tuple[list[torch.nn.Parameter], float]] = {}
    lowest = min(rates.values())
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = HEAD if is_head_param(name) else owners.get(name, "")
            groups.setdefault(key or "unowned", ([], rates.get(key, lowest)))[0].append(p)
    return groups


def make_optimizer(params: list[torch.nn.Parameter] | Mapping[str, tuple[list[torch.nn.Parameter], float]],
                   config: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser of `config.optimizer` over the trainable `params` (decay on matrices only): a list trains at
    `config.lr`, a mapping (`rate_groups`: name -> (parameters, peak rate)) each at its own rate. Every group
    keeps its `name` and `peak_lr` (what `GroupSchedule` scales)."""
    parts = {"all": (params, _peak(config))} if isinstance(params, list) else params
    groups = []
    for name, (members, lr) in parts.items():
        for decayed in (True, False):
            chosen = [p for p in members if (p.ndim > 1) == decayed]
            if chosen:
                groups.append({"params": chosen, "lr": lr, "peak_lr": lr, "name": name,
                               "weight_decay": config.weight_decay if decayed else 0.0})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=SGD_MOMENTUM, nesterov=False)
    return torch.optim.AdamW(groups)


class GroupSchedule:
    """One schedule for every group: each group's rate is its `peak_lr` times the same factor at every step. The
    factor is a timm cosine of peak 1 (its warm-up starts at 1e-2 and its cosine floor is 1e-3, or 1 for
    `constant`); timm's own scheduler over several groups would start every warm-up at one absolute rate and end
    every cosine at one absolute floor, so the groups' rates would not keep their ratio."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int, warmup_steps: int):
        self.optimizer = optimizer
        self._unit = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # carries the factor only
        timm_log = logging.getLogger("timm.scheduler.cosine_lr")
        level = timm_log.level
        timm_log.setLevel(logging.ERROR)  # a 1-step cosine is a constant, which timm logs a warning about
        try:
            self.cosine = CosineLRScheduler(self._unit, t_initial=max(total_steps - warmup_steps, 1),
                                            warmup_t=warmup_steps, warmup_lr_init=1e-2, warmup_prefix=True,
                                            lr_min=1.0 if config.scheduler == "constant" else 1e-3,
                                            t_in_epochs=False)
        finally:
            timm_log.setLevel(level)
        self._apply()

    @property
    def factor(self) -> float:
        """The share of its peak every group trains at now."""
        return float(self._unit.param_groups[0]["lr"])

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * self.factor

    def step_update(self, num_updates: int) -> None:
        """Set every group's rate for the step after `num_updates` optimiser steps."""
        self.cosine.step_update(num_updates)
        self._apply()


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int,
                   warmup_steps: int) -> GroupSchedule:
    """The per-step schedule of `config.scheduler`: call `step_update(step)` after every optimiser step.

    Both schedules are one cosine after the warm-up: `constant` is the cosine whose floor is the peak, so the
    warm-up is the same code under both and the flat part is exactly each group's peak lr.
    """
    return GroupSchedule(optimizer, config, total_steps, warmup_steps)
