"""Budget-share sizing: a depth space whose draws fit the budget by construction, so nothing is ever repaired.

A share space (`insertion: {mode: depth, depths: [...], side: [...], shares: [1, 2, 4]}`) asks, per component, its
depth and side as depth insertion does, and its options other than its size. Each chosen component whose size option
(LoRA's rank, an adapter's dim, a prompt length) the space searches then asks a share weight `noah.<method>.share`
when two or more such components are chosen. Sizes are never drawn; they follow from the budget:

1. every chosen component starts at the size of its domain with the fewest parameters; the slack is the budget
   minus the sum of their counts;
2. each sized component gets that smallest count plus its weight's fraction of the slack, and takes the size of its
   own domain with the most parameters that fit this allowance;
3. what rounding leaves over goes, largest weight first (ties: the earlier component), to a component that can grow
   into it.

The allowances sum to the budget, so the plan fits (a plan's exact count is at most the sum of its parts': methods
unfreezing the same backbone weights count them once). That the smallest counts fit, whatever depths are drawn, is
made sure once per space, backbone and budget (`depth_caps`): while the components' worst smallest counts at their
deepest allowed depths exceed the budget, one component's deepest depth is taken out of its domain: the smallest
such cut that makes everything fit (ties: the later component), else the largest cut, and again. At a budget where
every depth fits at the smallest sizes (1 % of ViT-B/16 holds the shipped share space's three components on every
block), no depth is taken out; at 1 % of the bundled 6-block backbone, VPT-deep's depth 6 is (15 parameters over).

What the sampler learns from is what trained: the depths, sides, options and weights it drew are the plan's, and
the sizes are a function of them.

With `fill` (`autopeft.space.sampler`), the share of the budget is asked first and the allowances sum to
floor(fill × budget) instead of the budget; the depths are capped once for the smallest fill, so a depth's choices
are the same in every trial.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from autopeft.errors import AutopeftError
from autopeft.space.bound import BoundSpace, Part, _extremes
from autopeft.space.domain import Domain
from autopeft.space.format import fill_target


def size_values(domain: Domain) -> tuple[int, ...]:
    """Every size a domain offers, ascending (an int range: each value on its grid)."""
    if domain.kind == "choice":
        return tuple(sorted(domain.values))
    return tuple(range(int(domain.low), int(domain.high) + 1, int(domain.step or 1)))


def _sized(bound: BoundSpace, part: Part) -> str | None:
    return None if part.empty else bound.derived_size(part.method)


def _sizes(bound: BoundSpace, part: Part, option: str) -> list[Part]:
    values = dict(part.values)
    return [part.with_values(tuple({**values, option: v}.items()))
            for v in size_values(bound.methods[part.method].domain(option))]


def smallest(bound: BoundSpace, part: Part) -> Part:
    """`part` at the size with the fewest parameters (ties: the smaller size); unsized parts as they are."""
    option = _sized(bound, part)
    return part if option is None else min(_sizes(bound, part, option), key=bound.count_part)


def fit(bound: BoundSpace, part: Part, allowance: float) -> Part:
    """`part` at the size with the most parameters within `allowance` (ties: the smaller size); at its smallest
    when none fits."""
    option = _sized(bound, part)
    if option is None:
        return part
    best = smallest(bound, part)
    for cand in _sizes(bound, part, option):
        if bound.count_part(best) < bound.count_part(cand) <= allowance:
            best = cand
    return best


def _worst_smallest(bound: BoundSpace, template: Part, depth: int | None) -> int:
    """The most parameters the place can need at its smallest sizes (over methods, sides and other options)."""
    worst = 0
    placements = [template] if depth is None else [replace(template, depth=depth, side=s) for s in bound.space.sides]
    for place in placements:
        methods = place.choices if place.depth is None else (place.method,)
        for m in methods:
            if place.depth == 0 or m not in bound.methods:
                continue
            derived = bound.derived_size(m)
            others = [(k, _extremes(d)) for k, d in bound.methods[m].searched() if k != derived]
            for combo in itertools.product(*(vals for _, vals in others)):
                chosen = dict(zip((k for k, _ in others), combo, strict=True))
                values = tuple((k, chosen.get(k, d.values[0] if d.kind == "choice" else int(d.low)))
                               for k, d in bound.methods[m].searched())
                worst = max(worst, bound.count_part(smallest(bound, replace(place, method=m, values=values))))
    return worst


def depth_caps(bound: BoundSpace, limit: int) -> dict[int, tuple[int, ...]]:
    """Per depth component (index into `bound.templates`): the depths it may take under `limit` (at the space's
    smallest fill of it), such that the components' smallest sizes fit whatever is drawn. Raises AutopeftError when
    no depths do."""
    key = ("depth_caps", limit)
    if key in bound.memo:
        return bound.memo[key]
    budget, limit = limit, fill_target(bound.space.lowest_fill(), limit)
    within = f"{limit:,} parameters" if limit == budget else \
        f"{limit:,} parameters (fill {bound.space.lowest_fill():g} of {budget:,})"
    templates = bound.templates
    deepest = {i: max(bound.depths) for i, t in enumerate(templates) if t.depth is not None}
    fixed = sum(_worst_smallest(bound, t, None) for t in templates if t.depth is None)

    def need(i: int, depth: int | None = None) -> int:
        return _worst_smallest(bound, templates[i], deepest[i] if depth is None else depth)

    def lower(i: int) -> int:
        return max(d for d in bound.depths if d < deepest[i])

    while (excess := fixed + sum(need(i) for i in deepest) - limit) > 0:
        lowerable = [i for i in deepest if any(d < deepest[i] for d in bound.depths)]
        if not lowerable:
            raise AutopeftError(
                f"{bound.space.source}: share space '{bound.space.name}' cannot size its plans within {within} "
                f"on {bound.spec.name}: its components at their smallest depths and sizes need "
                f"{limit + excess:,}; give a larger budget or a space whose depths include 0")
        saving = {i: need(i) - need(i, lower(i)) for i in lowerable}
        enough = [i for i in lowerable if saving[i] >= excess]
        # the smallest cut that makes every draw fit (ties: the later component), else the largest cut, and again
        i = min(enough, key=lambda j: (saving[j], -j)) if enough else max(lowerable, key=lambda j: (saving[j], -j))
        deepest[i] = lower(i)
    caps = {i: tuple(d for d in bound.depths if d <= deepest[i]) for i in deepest}
    bound.memo[key] = caps
    return caps


def derive(bound: BoundSpace, parts: list[Part], limit: int | None) -> list[Part]:
    """The parts with their sizes set from their share weights (module docstring); with no limit, every sized
    part at its largest size."""
    parts = [smallest(bound, p) for p in parts]
    sized = [i for i, p in enumerate(parts) if _sized(bound, p)]
    if limit is None:
        return [fit(bound, p, float("inf")) if i in sized else p for i, p in enumerate(parts)]
    slack = limit - sum(bound.count_part(p) for p in parts)
    if slack < 0:  # unreachable for depths within depth_caps
        raise AutopeftError(f"share space '{bound.space.name}': the drawn depths need {limit - slack:,} parameters "
                            f"at their smallest sizes, over the budget of {limit:,}")
    weights = {i: parts[i].share or 1 for i in sized}
    total_weight = sum(weights.values())
    out = list(parts)
    for i in sized:
        out[i] = fit(bound, parts[i], bound.count_part(parts[i]) + slack * weights[i] // total_weight)
    left = limit - sum(bound.count_part(p) for p in out)
    for i in sorted(sized, key=lambda j: -weights[j]):
        grown = fit(bound, out[i], bound.count_part(out[i]) + left)
        left -= bound.count_part(grown) - bound.count_part(out[i])
        out[i] = grown
    return out


def suggest_share_parts(trial: Any, bound: BoundSpace, limit: int | None, target: int | None = None) -> list[Part]:
    """Ask `trial` for a share space's decisions (depth, side, the options but the size, the share weights) and
    derive the sizes: the parts fit `target` (a space with `fill`: floor(fill × limit); else `limit`) by
    construction."""
    caps = depth_caps(bound, limit) if limit is not None else {}
    parts = []
    for idx, t in enumerate(bound.templates):
        if t.depth is not None:
            depth = _ask(trial, f"{t.unit}.{t.method}.depth", caps.get(idx, bound.depths), len(bound.depths) > 1)
            side = _ask(trial, f"{t.unit}.{t.method}.side", bound.space.sides, len(bound.space.sides) > 1) \
                if depth else bound.space.sides[0]
            part = replace(t, depth=depth, side=side)
        else:
            part = replace(t, method=_ask(trial, t.choice_param(), t.choices, len(t.choices) > 1))
        if not part.empty:
            derived = bound.derived_size(part.method)
            part = part.with_values(tuple(
                (k, size_values(d)[0] if k == derived else d.suggest(trial, part.option_param(k)))
                for k, d in bound.methods[part.method].searched()))
        parts.append(part)
    sized = [i for i, p in enumerate(parts) if _sized(bound, p)]
    if _asks_shares(bound, sized):
        for i in sized:
            parts[i] = replace(parts[i], share=_ask(trial, parts[i].option_param("share"), bound.space.shares, True))
    return derive(bound, parts, limit if target is None else target)


def _asks_shares(bound: BoundSpace, sized: list[int]) -> bool:
    return len(sized) > 1 and len(bound.space.shares) > 1


def _ask(trial: Any, name: str | None, choices: tuple, asked: bool) -> Any:
    return trial.suggest_categorical(name, list(choices)) if asked else choices[0]


def shares_of(bound: BoundSpace, parts: list[Part], limit: int | None) -> list[Part] | None:
    """The parts (with share weights) a share space derives to exactly these parts' plan, or None when no weights
    do or a depth is outside `depth_caps` (what `autopeft.space.sampler.expressed_parts` returns for a share space).
    With `fill`, the sizes are derived under the fill the plan is enqueued with (`SearchSpace.fill_of`)."""
    caps = depth_caps(bound, limit) if limit is not None else {}
    if any(p.depth is not None and p.depth not in caps.get(i, bound.depths) for i, p in enumerate(parts)):
        return None
    sized = [i for i, p in enumerate(parts) if _sized(bound, p)]
    target = bound.plan(parts)
    fill = bound.space.fill_of(bound.total(parts), limit) if limit is not None else None
    within = limit if fill is None or limit is None else fill_target(fill, limit)
    combos: Iterable[tuple[int | None, ...]] = itertools.product(bound.space.shares, repeat=len(sized)) \
        if _asks_shares(bound, sized) else [(None,) * len(sized)]
    for combo in combos:
        cand = list(parts)
        for i, w in zip(sized, combo, strict=True):
            cand[i] = replace(cand[i], share=w)
        derived = derive(bound, cand, within)
        if bound.plan(derived) == target:
            return derived
    return None
