"""The learning rate a run trains at when none is given: the plan's methods' own rates, fitted to the run.

Every method declares `lr_range` (autopeft.methods.base): the AdamW peak rates it wants on the reference run,
V-PEFT Bench's VTAB-1k recipe (ViT-B/16, width 768; 100 epochs of 800 images at batch 64 = REFERENCE_STEPS steps).
A plan's rate is the geometric mean of its parts' range centres, weighted by the parameters each part trains (a
plan of no part, the linear probe, takes the linear method's). Two factors fit it to the run:

    lr = plan rate × (REFERENCE_STEPS / steps) ** LENGTH_EXPONENT × (REFERENCE_WIDTH / width) ** WIDTH_EXPONENT

A run of fewer optimiser steps takes a larger rate (it has fewer steps to get as far; a smaller batch means more
steps, so a smaller rate), a narrower backbone a larger one (Adam's update of a matrix moves its outputs in
proportion to its fan-in; `width` is the backbone's feature width). Both exponents were chosen by measurement on
the bundled backbone, not derived (`python -m benchmarks.lr_sweep`, BENCHMARKS.md "Learning rates").

A run's peak rate is `lr` when one is given, else this derived rate, times `lr_scale` (1 by default; the default
search spaces search `lr_scale` around 1, so every trial trains at a rate relative to its own plan's).

No torch here: the CLI and the spaces use it before anything heavy is imported.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autopeft.backbones import BackboneSpec
    from autopeft.plan import PeftPlan
    from autopeft.train_config import TrainConfig

REFERENCE_STEPS = 1250
REFERENCE_WIDTH = 768
LENGTH_EXPONENT = 0.5
WIDTH_EXPONENT = 1.0


def centre(lr_range: tuple[float, float]) -> float:
    """The geometric centre of a (low, high) range."""
    low, high = lr_range
    return math.sqrt(low * high)


def plan_lr(plan: PeftPlan, spec: BackboneSpec) -> float:
    """The plan's rate on the reference run: its parts' centres, geometric mean weighted by their counts."""
    from autopeft.methods import get_method

    weighted, total = 0.0, 0
    for method, blocks in plan.groups():
        unfrozen = method.unfrozen(spec, blocks)
        count = spec.unfrozen_params(unfrozen) if unfrozen else method.count(spec, blocks)
        if count > 0:
            weighted += count * math.log(centre(method.lr_range))
            total += count
    if total == 0:
        return centre(get_method("linear").lr_range)
    return math.exp(weighted / total)


def run_factor(steps: float, width: int) -> float:
    """How much the reference rate is scaled for a run of `steps` optimiser steps on a backbone of `width`."""
    if steps <= 0 or width <= 0:
        raise ValueError(f"steps and width must be > 0, got {steps} and {width}")
    return (REFERENCE_STEPS / steps) ** LENGTH_EXPONENT * (REFERENCE_WIDTH / width) ** WIDTH_EXPONENT


def derived_lr(plan: PeftPlan, spec: BackboneSpec, steps: int) -> float:
    """The rate a run of `plan` of `steps` optimiser steps trains at when no `lr` is given (before `lr_scale`)."""
    return plan_lr(plan, spec) * run_factor(steps, spec.head_in_features)


def peak_lr(config: TrainConfig, plan: PeftPlan, spec: BackboneSpec, train_size: int) -> float:
    """The peak learning rate of a run on `train_size` images: `config.lr`, or the derived rate when it is None,
    times `config.lr_scale`."""
    from autopeft.train_config import total_steps

    if config.lr is not None:
        return float(config.lr * config.lr_scale)
    steps = total_steps(train_size, config.batch_size, config.epochs)
    return float(derived_lr(plan, spec, steps) * config.lr_scale)
