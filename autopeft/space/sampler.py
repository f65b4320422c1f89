"""Define-by-run sampling of a PeftPlan from a search space, feasible under a parameter budget by construction.

Sampling. `sample_plan(trial, space, spec, budget)` asks an optuna trial, place by place, for the method of each
slot (`block3.tune`, `group0.method`, `global.method`) and then only for the options of the chosen method
(`block3.lora.rank`, `global.vpt_shallow.length`); depth insertion asks `noah.lora.depth` (and `noah.lora.side`
when both sides are offered) and the component's options unless its depth is 0. `sample_hparams` asks for the
training hyper-parameters under their own names (`lr`, `weight_decay`). Nothing heavy happens: counts are closed
form and cached per space and backbone.

Repair. Draws ignore the budget; a draw over it is repaired deterministically: while the plan is over budget, take
the part with the most parameters and make the smallest cut that helps it: move one option to the next value of
its own domain with a lower count (a smaller rank, dim, length, depth or target set; int ranges halve towards
their low end), else set the place to `none` when it offers that, else switch the place to its cheapest setting.
Cutting the biggest part first spreads the budget over the sampled structure instead of wiping out whole methods,
and as every move only lowers the count and the space's smallest plan fits (checked before any trial), the loop ends
under budget. Every repaired value is a value of the same domain, so it is a point the sampler could have drawn.

A share space (`insertion: shares`, `autopeft.space.shares`) draws no sizes: they follow from the budget, every
draw fits, and nothing is repaired.

Learning. Optuna cannot change a value a trial has suggested, so the trial keeps the draw in `trial.params`, and the
repaired plan is recorded in user attributes: `plan` (the PeftPlan dict that is trained), `peft_params`, and
`repaired` (parameter -> repaired value, None for a parameter the repaired plan no longer uses; empty when the draw
fitted). The engine's TPE (`autopeft.search.samplers.RepairedTPE`) models each trial by `repaired_params`, the values
of the plan that trained, every one a value of its domain: a draw of rank 16 that trained at rank 2 teaches it
about rank 2.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from autopeft.backbones import BackboneSpec
from autopeft.budget import Budget
from autopeft.errors import AutopeftError
from autopeft.plan import PeftPlan
from autopeft.records import ATTR_PARAMS, ATTR_PLAN
from autopeft.space.bound import BoundSpace, Part, bind
from autopeft.space.format import SearchSpace
from autopeft.space.repair import repair
from autopeft.space.shares import depth_caps, shares_of, suggest_share_parts


def _limit(budget: Budget | int | None) -> int | None:
    if budget is None:
        return None
    return budget.limit if isinstance(budget, Budget) else int(budget)


def check_feasible(space: SearchSpace, spec: BackboneSpec, budget: Budget | int | None) -> BoundSpace:
    """Bind `space` to `spec` and raise AutopeftError when even its smallest plan exceeds `budget`."""
    bound = bind(space, spec)
    limit = _limit(budget)
    if limit is None:
        return bound
    need = bound.total(bound.smallest_parts())
    if need > limit:
        percent = math.ceil(100.0 * need / spec.backbone_params * 1000) / 1000
        given = budget.text if isinstance(budget, Budget) else f"{limit:,}"
        raise AutopeftError(
            f"{space.source}: the smallest plan of space '{space.name}' needs {need:,} trainable parameters on "
            f"{spec.name}, but the budget {given} allows {limit:,}; use a budget of at least {need:,} "
            f"({percent:g}%) or a smaller space"
        )
    if space.shares:
        depth_caps(bound, limit)  # raises when no depths let every draw fit
    return bound


def suggest_parts(trial: Any, bound: BoundSpace, limit: int | None = None) -> list[Part]:
    """Ask `trial` for every decision of the space (conditionally), without looking at any budget; a share space
    asks its share weights instead of sizes and derives the sizes from `limit` (`autopeft.space.shares`)."""
    if bound.space.shares:
        return suggest_share_parts(trial, bound, limit)
    parts = []
    for t in bound.templates:
        part = t
        if t.depth is not None:
            depth = _ask(trial, f"{t.unit}.{t.method}.depth", bound.depths)
            side = _ask(trial, f"{t.unit}.{t.method}.side", bound.space.sides) if depth else bound.space.sides[0]
            part = replace(t, depth=depth, side=side)
        else:
            part = replace(t, method=_ask(trial, t.choice_param(), t.choices))
        if not part.empty:
            searched = bound.methods[part.method].searched()
            part = part.with_values(tuple((k, d.suggest(trial, part.option_param(k))) for k, d in searched))
        parts.append(part)
    return parts


def _ask(trial: Any, name: str | None, choices: tuple) -> Any:
    return trial.suggest_categorical(name, list(choices)) if len(choices) > 1 else choices[0]


def expressed_parts(bound: BoundSpace, plan: PeftPlan, limit: int | None) -> list[Part] | None:
    """The parts whose parameters make the sampler draw exactly `plan` under `limit` (`BoundSpace.parts_of`, with a
    share space's weights), or None when the space cannot draw it."""
    parts = bound.parts_of(plan)
    if parts is None or not bound.space.shares:
        return parts
    return shares_of(bound, parts, limit)


def sample_parts(trial: Any, space: SearchSpace, spec: BackboneSpec, budget: Budget | int | None) -> list[Part]:
    """Draw and repair; records `plan`, `peft_params` and `repaired` as user attributes of the trial."""
    bound = check_feasible(space, spec, budget)
    limit = _limit(budget)
    drawn = suggest_parts(trial, bound, limit)
    parts = drawn if limit is None or space.shares else repair(bound, drawn, limit)
    before, after = bound.params(drawn), bound.params(parts)
    repaired = {k: v for k, v in after.items() if before.get(k) != v}
    repaired.update({k: None for k in before if k not in after})
    if hasattr(trial, "set_user_attr"):
        trial.set_user_attr(ATTR_PLAN, bound.plan(parts).to_dict())
        trial.set_user_attr(ATTR_PARAMS, bound.total(parts))
        trial.set_user_attr("repaired", repaired)
    return parts


def sample_plan(trial: Any, space: SearchSpace, spec: BackboneSpec, budget: Budget | int | None) -> PeftPlan:
    """Sample a PeftPlan from `space` for backbone `spec` within `budget` (None: no budget).

    Args:
        trial: an optuna Trial (anything with optuna's `suggest_*` methods).
        space: the search space.
        spec: the backbone.
        budget: the parameter budget (a Budget or an absolute count).

    Raises:
        AutopeftError: when the space's smallest plan exceeds the budget.
    """
    parts = sample_parts(trial, space, spec, budget)
    return bind(space, spec).plan(parts)


def sample_hparams(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """Ask `trial` for the searched training hyper-parameters; fixed ones are returned as they are."""
    return {name: domain.suggest(trial, name) for name, domain in space.training}


def repaired_params(trial: Any, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The parameters of `trial` (optuna Trial or FrozenTrial; `params` instead of its own when given) with the
    budget repair applied: the parameters of the plan that trained."""
    out = dict(trial.params if params is None else params)
    for k, v in (trial.user_attrs.get("repaired") or {}).items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out
