"""A summary of a search space on one backbone (and budget): what `autopeft space show` prints.

Sizes, the smallest and largest plans, and which methods fit where: a method is feasible at a place (a block, a
group, a depth, the global slot) when the space's smallest plan with that place holding the method at its smallest
options fits the budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from autopeft.backbones import BackboneSpec
from autopeft.budget import Budget
from autopeft.space.bound import BoundSpace, Part, bind
from autopeft.space.format import FILL_PARAM, NONE, SearchSpace, fill_target


def ranges(blocks: Iterable[int]) -> str:
    """`0-3,8` for {0, 1, 2, 3, 8}."""
    out: list[str] = []
    for b in sorted(set(blocks)):
        if out and out[-1].split("-")[-1] == str(b - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{b}"
        else:
            out.append(str(b))
    return ",".join(out)


def insertion_text(space: SearchSpace) -> str:
    if space.mode == "block":
        text = "per block (each block decides independently)"
    elif space.mode == "group":
        text = f"per group of {space.group_size} consecutive blocks"
    else:
        sides = " or ".join(space.sides)
        text = f"NOAH-style: each method on its {sides} d blocks, d in {list(space.depths)}"
        if space.shares:
            text += f"; sizes from each method's share of the budget, weights {list(space.shares)}"
    if space.fill is not None:
        text += f"; each plan fitted to a fill {space.fill.describe()} of the budget ({FILL_PARAM})"
    return text


def _plan_info(bound: BoundSpace, parts: list[Part]) -> dict[str, Any]:
    count = bound.total(parts)
    return {"params": count, "percent": 100.0 * count / bound.spec.backbone_params,
            "plan": bound.plan(parts).short()}


def describe(space: SearchSpace, spec: BackboneSpec, budget: Budget | None = None) -> dict[str, Any]:
    """Everything `autopeft space show` reports, as plain data."""
    bound = bind(space, spec)
    size = bound.size()
    training_sizes = [d.size() for _, d in space.training if d.searched]
    info: dict[str, Any] = {
        "space": space.name,
        "source": space.source,
        "description": space.description,
        "insertion": insertion_text(space),
        "slots": {s.name: list(s.choices) for s in space.slots},
        "global": list(space.global_choices),
        "methods": {m: {k: d.describe() for k, d in bound.methods[m].options} for m in bound.methods},
        "training": {k: d.describe() for k, d in space.training},
        "fill": None if space.fill is None else space.fill.describe(),
        "mergeable_only": space.mergeable_only,
        "notes": list(bound.notes),
        "backbone": {"name": spec.name, "family": spec.family, "blocks": spec.num_blocks,
                     "params": spec.backbone_params},
        "size": {"plans": size, "log10_plans": round(math.log10(size), 2) if size else None,
                 "training": None if None in training_sizes else math.prod(training_sizes)},
        "smallest": _plan_info(bound, bound.smallest_parts()),
        "largest": _plan_info(bound, bound.largest_parts()),
        "budget": None,
    }
    if budget is not None:
        info["budget"] = {"text": budget.text, "limit": budget.limit, "percent": budget.percent}
        info["feasible"] = info["smallest"]["params"] <= fill_target(space.lowest_fill(), budget.limit)
        info["methods_at_budget"] = feasibility(bound, budget.limit)
        if space.shares and info["feasible"]:
            from autopeft.space.shares import depth_caps

            caps = depth_caps(bound, budget.limit)
            info["share_depths"] = {bound.templates[i].method: list(d) for i, d in caps.items()}
            info["share_depths_offered"] = list(bound.depths)
    return info


def feasibility(bound: BoundSpace, limit: int) -> list[dict[str, Any]]:
    """Per method: where it fits `limit` (the rest of the plan at its smallest), its smallest size at one place,
    and the size of the plan that puts it, at its smallest, on every place that offers it."""
    smallest = bound.smallest_parts()
    rows: dict[str, dict[str, Any]] = {}
    everywhere: dict[str, list[Part]] = {}
    for idx, t in enumerate(bound.templates):
        for m in t.choices:
            if m == NONE:
                continue
            row = rows.setdefault(m, {"method": m, "feasible": [], "places": 0, "min_params": None})
            options = [bound.configs(t, m, min, depth=d) for d in bound.depths if d] if t.depth is not None else [
                bound.configs(t, m, min)]
            if options:  # every place: a depth component on all the blocks it may take (its deepest depth)
                everywhere.setdefault(m, list(smallest))[idx] = max(options, key=lambda p: p.depth or 0)
            for cand in options:
                row["places"] += 1
                own = bound.count_part(cand)
                row["min_params"] = own if row["min_params"] is None else min(row["min_params"], own)
                if bound.total(smallest[:idx] + [cand] + smallest[idx + 1 :]) <= limit:
                    row["feasible"].append(_where(cand))
    out = []
    for m, row in rows.items():
        count = bound.total(everywhere[m])
        row["everywhere_params"] = count
        row["everywhere_fits"] = count <= limit
        row["where"] = _where_text(row["feasible"])
        out.append(row)
    return out


def _where(part: Part) -> Any:
    if part.depth is not None:
        return ("depth", part.depth)
    if not part.blocks:
        return ("global", 0)
    return ("blocks", part.blocks)


def _where_text(places: list) -> str:
    if not places:
        return "nowhere"
    kinds = {k for k, _ in places}
    if kinds == {"global"}:
        return "global"
    if kinds == {"depth"}:
        return "depth " + ", ".join(str(d) for _, d in places)
    return "blocks " + ranges(b for _, blocks in places for b in blocks)
