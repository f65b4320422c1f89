"""The optimiser and learning-rate schedule of a training run, built from its TrainConfig.

Two optimisers and two schedules, both schedules after the same linear warm-up (from 1 % of the peak lr):

- `adamw`: AdamW, as V-PEFT Bench trains (the default).
- `sgd`: SGD with momentum 0.9, Nesterov off. Its weight decay is torch's coupled L2 term, AdamW's is decoupled, so
  the same `weight_decay` value is not the same regularisation under both.
- `cosine`: a cosine from the peak down to 1e-3 of it, reaching the floor at the last step (the default).
- `constant`: the peak after the warm-up, flat to the end.

Weight decay applies to matrices only; biases, norms and scales (1-d parameters) are not decayed, under both
optimisers.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from timm.scheduler import CosineLRScheduler

from autopeft.train_config import OPTIMIZERS, SCHEDULERS, SGD_MOMENTUM  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from autopeft.train_config import TrainConfig


def _peak(config: TrainConfig) -> float:
    if config.lr is None:  # `auto` is resolved where the plan and the data are known (autopeft.train.set_up)
        raise ValueError("the optimiser needs a resolved learning rate; autopeft.learning_rate.peak_lr gives it")
    return config.lr


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser of `config.optimizer` over the trainable `params` (decay on matrices only), at `config.lr`."""
    lr = _peak(config)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=SGD_MOMENTUM, nesterov=False)
    return torch.optim.AdamW(groups, lr=lr)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int,
                   warmup_steps: int) -> CosineLRScheduler:
    """The per-step schedule of `config.scheduler`: call `step_update(step)` after every optimiser step.

    Both schedules are one timm cosine after the warm-up: `constant` is the cosine whose floor is the peak, so the
    warm-up is the same code under both and the flat part is exactly the peak lr.
    """
    lr = _peak(config)
    floor = lr if config.scheduler == "constant" else lr * 1e-3
    timm_log = logging.getLogger("timm.scheduler.cosine_lr")
    level = timm_log.level
    timm_log.setLevel(logging.ERROR)  # a 1-step cosine is a constant, which timm logs a warning about
    try:
        return CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup_steps, 1), warmup_t=warmup_steps,
                                 warmup_lr_init=lr * 1e-2, warmup_prefix=True, lr_min=floor,
                                 t_in_epochs=False)
    finally:
        timm_log.setLevel(level)
