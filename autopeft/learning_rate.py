"""The learning rates a run trains at when none is given: each method's own rate, fitted to the run.

Every method declares `lr_range` (autopeft.methods.base): the AdamW peak rates it wants on the reference run,
V-PEFT Bench's VTAB-1k recipe (ViT-B/16, width 768; 100 epochs of 800 images at batch 64 = REFERENCE_STEPS steps).
Each part of a plan trains at its own method's range centre, in its own optimiser group (autopeft.optim); the
classification head trains at the plan's rate (`plan_lr`: the parts' centres, geometric mean weighted by the
parameters each trains; the linear method's for the linear probe), as it did before per-method rates. (Measured
with the head at the linear method's rate instead, 10 times a LoRA plan's: the second epoch's train loss jumped
2-5 fold and fmnist_count_fs lost 10-16 points at lr_scale < 1, BENCHMARKS.md "Rate cliff: per-method rates".)
Two factors fit every rate to the run alike:

    rate = method centre × (REFERENCE_STEPS / steps) ** LENGTH_EXPONENT × (REFERENCE_WIDTH / width) ** WIDTH_EXPONENT

A run of fewer optimiser steps takes a larger rate (it has fewer steps to get as far; a smaller batch means more
steps, so a smaller rate), a narrower backbone a larger one (Adam's update of a matrix moves its outputs in
proportion to its fan-in; `width` is the backbone's feature width). Both exponents were chosen by measurement on
the bundled backbone, not derived (`python -m benchmarks.lr_sweep`, BENCHMARKS.md "Learning rates").

Before [P] part 2 every part trained at the plan's rate too (`plan_lr`, still the one-shot supernet's per-step
factor): a mix of LoRA and prompts trained its LoRA at twice LoRA's rate.

Every group's peak rate is `lr` when one is given (then all groups train at it, as a recipe with one fixed rate
always has), else its derived rate, times `lr_scale` (1 by default; the shipped search spaces search `lr_scale`, so
every trial trains each of its methods at a rate relative to that method's own). A run's reported `lr` is the
largest of its groups' peak rates; `peak_rates` gives them all.

No torch here: the CLI and the spaces use it before anything heavy is imported.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autopeft.backbones import BackboneSpec
    from autopeft.methods.base import MethodSpec
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


def _trained(method: MethodSpec, blocks: tuple[int, ...], spec: BackboneSpec) -> int:
    """The parameters `method` trains at `blocks`: those it unfreezes, or those it adds."""
    unfrozen = method.unfrozen(spec, blocks)
    return spec.unfrozen_params(unfrozen) if unfrozen else method.count(spec, blocks)


def plan_lr(plan: PeftPlan, spec: BackboneSpec) -> float:
    """The plan's one rate on the reference run, its parts' centres' geometric mean weighted by their counts: its
    head's rate (`method_rates`); before per-method rates every part's too."""
    from autopeft.methods import get_method

    weighted, total = 0.0, 0
    for method, blocks in plan.groups():
        count = _trained(method, blocks, spec)
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


HEAD = "head"  # the rate group of the classification head (at the plan's rate, `plan_lr`)


def method_rates(plan: PeftPlan, spec: BackboneSpec) -> dict[str, float]:
    """Each training part's rate on the reference run, by method name (the centre of its `lr_range`), and the
    head's (`HEAD`: the plan's, `plan_lr`). A method that trains no parameter on this backbone has none."""
    rates = {}
    for method, blocks in plan.groups():
        if _trained(method, blocks, spec) > 0:
            rates[method.name] = centre(method.lr_range)
    rates[HEAD] = plan_lr(plan, spec)
    return rates


def peak_rates(config: TrainConfig, plan: PeftPlan, spec: BackboneSpec, train_size: int) -> dict[str, float]:
    """The peak rate of every group of a run on `train_size` images (`method_rates`' names): `config.lr` for all
    when it is given, else each derived one (its centre × `run_factor`), times `config.lr_scale`."""
    from autopeft.train_config import total_steps

    rates = method_rates(plan, spec)
    if config.lr is not None:
        return {name: float(config.lr * config.lr_scale) for name in rates}
    factor = run_factor(total_steps(train_size, config.batch_size, config.epochs), spec.head_in_features)
    return {name: float(rate * factor * config.lr_scale) for name, rate in rates.items()}
