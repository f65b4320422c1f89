"""The one-shot supernet of a search space: every method the space may place on a block, on that block, built once at
the cover of the space's option values (the largest rank, dim or length; every target or position any choice names),
and any plan the space can draw run as a slice of it with the shared weights.

    cover = cover_plan(bind(space, spec))
    slices = {}
    model = cover.apply(backbone, spec, slices)       # or train.set_up(..., slices=slices)
    net = Supernet(cover, slices)
    net.activate(plan)                                # model now computes `plan` built alone with these weights

Which module runs how at a smaller spec is the methods' own business (`autopeft.methods.base.Sliceable`); this
module only maps a plan's (block, method) entries to the modules the cover put there.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from autopeft.errors import AutopeftError
from autopeft.methods.base import MethodSpec, Sliceable, get_method
from autopeft.plan import PeftPlan
from autopeft.space.bound import BoundSpace, _extremes
from autopeft.space.format import NONE

Key = tuple[int | None, str]


def cover_specs(bound: BoundSpace) -> dict[str, MethodSpec]:
    """Each method of the bound space at the cover of its option domains (every value a draw may give it).

    Raises AutopeftError naming the methods that cannot be sliced (`MethodSpec.sliceable`)."""
    used = sorted({m for t in bound.templates for m in t.choices if m != NONE})
    unsliceable = [m for m in used if not get_method(m).sliceable]
    if unsliceable:
        able = sorted(m for m in used if m not in unsliceable)
        raise AutopeftError(
            f"space '{bound.space.name}' has method(s) {', '.join(unsliceable)} that cannot run inside a one-shot "
            "supernet (their modules cannot be sliced or switched off per block); use a space of "
            f"{', '.join(able) if able else 'sliceable methods'} only (e.g. --space oneshot or noah), "
            "or --strategy trials")
    out = {}
    for m in used:
        ms = bound.methods[m]
        values = {k: (d.value,) if d.kind == "fixed" else tuple(_extremes(d)) for k, d in ms.options}
        out[m] = get_method(m).cover(values)
    return out


def cover_plan(bound: BoundSpace) -> PeftPlan:
    """The supernet's plan: every method any place of the space offers, on every block that place covers (a depth
    component on all its blocks), at its cover."""
    covers = cover_specs(bound)
    blocks: dict[int, list[MethodSpec]] = {}
    global_parts: list[MethodSpec] = []
    for t in bound.templates:
        for m in t.choices:
            if m == NONE:
                continue
            spec = covers[m]
            if spec.scope == "global":
                if spec not in global_parts:
                    global_parts.append(spec)
                continue
            for i in t.blocks:
                if spec not in blocks.setdefault(i, []):
                    blocks[i].append(spec)
    return PeftPlan(blocks={i: tuple(s) for i, s in blocks.items()}, global_parts=tuple(global_parts))


def covers(cover: MethodSpec, spec: MethodSpec) -> bool:
    """Whether modules built at `cover` run `spec`: the cover of both is `cover` itself."""
    if type(cover) is not type(spec):
        return False
    both = {f.name: (getattr(cover, f.name), getattr(spec, f.name)) for f in fields(cover)}
    return type(cover).cover(both) == cover


@dataclass
class Supernet:
    """The cover plan and the Sliceable modules each of its (block, method) entries inserted (`PeftPlan.apply`)."""

    cover: PeftPlan
    slices: dict[Key, list[Sliceable]]

    def __post_init__(self) -> None:
        self._covers: dict[Key, MethodSpec] = {(None, s.name): s for s in self.cover.global_parts}
        self._covers.update({(i, s.name): s for i, specs in self.cover.blocks.items() for s in specs})

    def entries(self, plan: PeftPlan) -> dict[Key, MethodSpec]:
        """The plan's specs by (block, method); AutopeftError for one the supernet cannot run."""
        out: dict[Key, MethodSpec] = {}
        items: list[tuple[Key, MethodSpec]] = [((None, s.name), s) for s in plan.global_parts]
        items += [((i, s.name), s) for i, specs in plan.blocks.items() for s in specs]
        cover = self._covers
        for key, s in items:
            if key in out:
                raise AutopeftError(f"{s.name} is twice on block {key[0]}: a supernet holds one of each method a block")
            if key not in cover or not covers(cover[key], s):
                where = "globally" if key[0] is None else f"on block {key[0]}"
                raise AutopeftError(f"the supernet cannot run {s.short()} {where}: its space does not offer it there")
            out[key] = s
        return out

    def activate(self, plan: PeftPlan) -> None:
        """Make the supernet compute `plan` (every other module switched off)."""
        active = self.entries(plan)
        for key, modules in self.slices.items():
            for m in modules:
                m.set_active(active.get(key))

    def sliced_state(self, model: nn.Module, plan: PeftPlan) -> dict[str, Any]:
        """The active slices' parameters by (block, method) and module site (see `sites`); `activate` first."""
        named = sites(model)
        out: dict[str, Any] = {}
        for key in self.entries(plan):
            for m in self.slices.get(key, []):
                state = m.sliced_state()
                if state:
                    out[f"{key[0]}/{key[1]}/{named[id(m)]}"] = state
        return out


def sites(model: nn.Module) -> dict[int, str]:
    """Each module's site: its path with the `.base` steps of the wrappers around it left out, so a module of a
    method is at the same site in a supernet and in the plan built alone."""
    return {id(m): ".".join(p for p in name.split(".") if p != "base") for name, m in model.named_modules()}


def parameter_count(state: dict[str, dict[str, torch.Tensor]]) -> int:
    """Parameters of a `Supernet.sliced_state`."""
    return sum(t.numel() for s in state.values() for t in s.values())
