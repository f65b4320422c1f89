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

Fill. Without `fill` the budget is a cap, and the share of it a plan spends is what ~40 per-place draws and the
repair happen to leave. A space with `fill` (a share of the budget in (0, 1]: fixed, choices or a range) makes it one
decision: `budget.fill` is asked before any of the plan's, and the plan is fitted to target = floor(fill × budget):
repaired down to it as above, then grown up to it (`autopeft.space.repair.fill_up`): while a step fits, the part
with the fewest parameters (ties: the earlier part) takes its smallest growth step, its size option (rank, dim,
length) moved to the value of its domain with the next higher count; a step that would pass the target is skipped.
Growth changes sizes only, never a method, a depth or a place switched off, so the plan's structure is the
repaired draw's; it ends within the target and less than one step (of any part that can still grow) below it. A
share space sizes its components to the target. A baseline (a trial enqueued with the `baseline` user attribute,
and `budget.fill` from `fill_param`) is repaired to its target but never grown, so it trains the hand-picked plan.

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
from autopeft.records import ATTR_BASELINE, ATTR_PARAMS, ATTR_PLAN
from autopeft.space.bound import BoundSpace, Part, bind
from autopeft.space.format import FILL_PARAM, SearchSpace, fill_target
from autopeft.space.repair import fill_up, repair
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
    given = budget.text if isinstance(budget, Budget) else f"{limit:,}"
    need = bound.total(bound.smallest_parts())
    if need > limit:
        percent = math.ceil(100.0 * need / spec.backbone_params * 1000) / 1000
        raise AutopeftError(
            f"{space.source}: the smallest plan of space '{space.name}' needs {need:,} trainable parameters on "
            f"{spec.name}, but the budget {given} allows {limit:,}; use a budget of at least {need:,} "
            f"({percent:g}%) or a smaller space"
        )
    low = space.lowest_fill()
    if need > fill_target(low, limit):
        raise AutopeftError(
            f"{space.source}: the smallest plan of space '{space.name}' needs {need:,} trainable parameters on "
            f"{spec.name}, but its smallest fill {low:g} of the budget {given} allows {fill_target(low, limit):,}; "
            f"use a budget of at least {math.ceil(need / low):,}, a fill of at least "
            f"{math.ceil(need / limit * 1000) / 1000:g} or a smaller space"
        )
    if space.shares:
        depth_caps(bound, limit)  # raises when no depths let every draw fit
    return bound


def suggest_fill(trial: Any, space: SearchSpace, limit: int | None) -> int | None:
    """The count a plan is fitted to: with `fill` and a `limit`, floor(fill × limit), `budget.fill` asked when the
    space searches it; else `limit` (None: no budget, nothing asked)."""
    if limit is None or space.fill is None:
        return limit
    return fill_target(space.fill.suggest(trial, FILL_PARAM), limit)


def fill_param(bound: BoundSpace, parts: list[Part], limit: int | None) -> dict[str, float]:
    """`{"budget.fill": f}` for parts enqueued as a trial of a space that searches `fill` (`SearchSpace.fill_of`:
    their share of `limit` snapped to the fill domain, so they are not shrunk unless their share is above every
    fill); empty when the space asks no fill or there is no limit."""
    if limit is None or bound.space.fill is None or not bound.space.fill.searched:
        return {}
    fill = bound.space.fill_of(bound.total(parts), limit)
    assert fill is not None
    return {FILL_PARAM: fill}


def suggest_parts(trial: Any, bound: BoundSpace, limit: int | None = None) -> list[Part]:
    """Ask `trial` for every decision of the space (conditionally), without looking at any budget but for `fill`
    (asked first, when the space has it and `limit` is given); a share space asks its share weights instead of sizes
    and derives the sizes from `limit`, or its fill of it (`autopeft.space.shares`)."""
    return _draw(trial, bound, limit)[0]


def _draw(trial: Any, bound: BoundSpace, limit: int | None) -> tuple[list[Part], int | None]:
    """The drawn parts and the count they are to be fitted to (`suggest_fill`)."""
    target = suggest_fill(trial, bound.space, limit)
    if bound.space.shares:
        return suggest_share_parts(trial, bound, limit, target), target
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
    return parts, target


def _ask(trial: Any, name: str | None, choices: tuple) -> Any:
    return trial.suggest_categorical(name, list(choices)) if len(choices) > 1 else choices[0]


def expressed_parts(bound: BoundSpace, plan: PeftPlan, limit: int | None) -> list[Part] | None:
    """The parts whose parameters make the sampler draw exactly `plan` under `limit` (`BoundSpace.parts_of`, with a
    share space's weights), or None when the space cannot draw it. With a searched `fill`, enqueue `fill_param` of
    these parts with them."""
    parts = bound.parts_of(plan)
    if parts is None or not bound.space.shares:
        return parts
    return shares_of(bound, parts, limit)


def sample_parts(trial: Any, space: SearchSpace, spec: BackboneSpec, budget: Budget | int | None) -> list[Part]:
    """Draw and repair (and, with `fill`, grow); records `plan`, `peft_params` and `repaired` as user attributes of
    the trial."""
    bound = check_feasible(space, spec, budget)
    drawn, target = _draw(trial, bound, _limit(budget))
    parts = drawn if target is None or space.shares else repair(bound, drawn, target)
    if target is not None and space.fill is not None and not space.shares and not _baseline(trial):
        parts = fill_up(bound, parts, target)
    before, after = bound.params(drawn), bound.params(parts)
    repaired = {k: v for k, v in after.items() if before.get(k) != v}
    repaired.update({k: None for k in before if k not in after})
    if hasattr(trial, "set_user_attr"):
        trial.set_user_attr(ATTR_PLAN, bound.plan(parts).to_dict())
        trial.set_user_attr(ATTR_PARAMS, bound.total(parts))
        trial.set_user_attr("repaired", repaired)
    return parts


def _baseline(trial: Any) -> bool:
    """Whether `trial` is an enqueued baseline, which trains its hand-picked plan: never grown."""
    return bool((getattr(trial, "user_attrs", None) or {}).get(ATTR_BASELINE))


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
