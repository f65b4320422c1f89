"""A search space bound to one backbone: its decision places, exact counting, and its smallest and largest plans.

Binding drops what the backbone cannot take (methods of another family, option values a method's `check` rejects,
depths beyond the last block), each with a note; it is an error when nothing remains. Counting goes through
`MethodSpec.count` only (closed form, no model built), cached, and groups identical specs over blocks exactly as
`PeftPlan.count` does, so a plan's count here equals `PeftPlan.count` and `autopeft params --plan`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from autopeft.backbones import BackboneSpec
from autopeft.errors import AutopeftError, UnsupportedBackbone
from autopeft.methods import MethodSpec, get_method, make_spec
from autopeft.plan import PeftPlan
from autopeft.space.domain import Domain
from autopeft.space.format import NONE, MethodSpace, SearchSpace

DEPTH_PREFIX = "noah"
GLOBAL_UNIT = "global"


def is_plan_param(name: str) -> bool:
    """Whether an Optuna parameter name is one of a plan's decisions (`unit.slot`, `unit.method.option`), not a
    training hyper-parameter (those are TrainConfig field names, which hold no dot)."""
    return "." in name


@dataclass(frozen=True)
class Part:
    """One decision place of a plan (a slot of a block or group, a depth component, the global choice) and what
    is currently decided there.

    Attributes:
        unit: parameter prefix: `block3`, `group0`, `noah` (depth insertion) or `global`.
        slot: the slot name (`method` for the global choice, the method name for a depth component).
        choices: the methods the place may hold, `none` included when it may stay empty.
        method: the chosen method, or `none`.
        values: the searched option values, as (option, value) pairs.
        blocks: the blocks the unit covers; a depth component is placed on its first/last `depth` of them.
        depth: depth insertion only: how many blocks the component covers.
        side: depth insertion only: `first` or `last` blocks.
        share: a share space only: the component's share weight of the budget (None when not asked: one sized
            component chosen, or none; see `autopeft.space.shares`).
    """

    unit: str
    slot: str
    choices: tuple[str, ...]
    method: str = NONE
    values: tuple[tuple[str, Any], ...] = ()
    blocks: tuple[int, ...] = ()
    depth: int | None = None
    side: str | None = None
    share: int | None = None

    @property
    def placed(self) -> tuple[int, ...]:
        """The blocks the chosen method goes on."""
        if self.depth is None:
            return self.blocks
        if self.side == "last":
            return self.blocks[len(self.blocks) - self.depth :] if self.depth else ()
        return self.blocks[: self.depth]

    @property
    def empty(self) -> bool:
        return self.method == NONE or self.depth == 0

    def choice_param(self) -> str | None:
        """The optuna parameter holding the method choice (None when the place offers one method)."""
        return f"{self.unit}.{self.slot}" if len(self.choices) > 1 else None

    def option_param(self, option: str) -> str:
        return f"{self.unit}.{self.method}.{option}"

    def with_values(self, values: tuple[tuple[str, Any], ...]) -> Part:
        """This part with other option values (`dataclasses.replace` is too slow for the repair's inner loop)."""
        return Part(self.unit, self.slot, self.choices, self.method, values, self.blocks, self.depth, self.side,
                    self.share)


@dataclass
class BoundSpace:
    """`space` on `spec`: the parts to decide, the methods' option domains after binding, and notes."""

    space: SearchSpace
    spec: BackboneSpec
    templates: list[Part]
    methods: dict[str, MethodSpace]
    depths: tuple[int, ...]
    notes: list[str]
    _specs: dict = field(default_factory=dict, repr=False)
    _counts: dict = field(default_factory=dict, repr=False)
    _part_specs: dict = field(default_factory=dict, repr=False)
    _part_counts: dict = field(default_factory=dict, repr=False)
    _cheapest: dict = field(default_factory=dict, repr=False)
    memo: dict = field(default_factory=dict, repr=False)  # caches of the sampler's repair

    # -- counting ---------------------------------------------------------------------------------------------------

    def method_spec(self, method: str, values: Iterable[tuple[str, Any]]) -> MethodSpec:
        key = (method, tuple(sorted(values)))
        if key not in self._specs:
            self._specs[key] = make_spec(method, {**self.methods[method].fixed(), **dict(key[1])})
        return self._specs[key]

    def part_spec(self, part: Part) -> MethodSpec | None:
        try:
            return self._part_specs[part]
        except KeyError:
            spec = self._part_specs[part] = None if part.empty else self.method_spec(part.method, part.values)
            return spec

    def count_of(self, spec: MethodSpec, blocks: tuple[int, ...]) -> tuple[int, frozenset]:
        """(parameters added, existing parameter groups unfrozen) of `spec` at `blocks`, cached.

        Keyed by the spec's identity: `method_spec` hands out one object per distinct spec and keeps it alive.
        """
        key = (id(spec), blocks)
        if key not in self._counts:
            unfrozen = frozenset(spec.unfrozen(self.spec, blocks))
            self._counts[key] = (0 if unfrozen else spec.count(self.spec, blocks), unfrozen)
        return self._counts[key]

    def unfrozen_count(self, unfrozen: frozenset) -> int:
        """Parameters of a union of unfrozen backbone parameter groups, cached."""
        cache = self.memo.setdefault("unfrozen", {})
        if unfrozen not in cache:
            cache[unfrozen] = self.spec.unfrozen_params(set(unfrozen))
        return cache[unfrozen]

    def count_part(self, part: Part) -> int:
        """Parameters of one part on its own."""
        try:
            return self._part_counts[part]
        except KeyError:
            pass
        spec = self.part_spec(part)
        count = 0 if spec is None else self.total_of([spec], [part.placed])
        self._part_counts[part] = count
        return count

    def total(self, parts: Sequence[Part]) -> int:
        """Exact parameters of the plan the parts make."""
        return self.total_of([self.part_spec(p) for p in parts], [p.placed for p in parts])

    def total_of(self, specs: Sequence[MethodSpec | None], placed: Sequence[tuple[int, ...]]) -> int:
        """Exact parameters of specs at blocks, counted as `PeftPlan.count` does: identical specs on several blocks
        form one group, and the weights unfreezing methods open up are counted once (their union)."""
        groups: dict[int, list] = {}
        for spec, blocks in zip(specs, placed, strict=True):
            if spec is not None:
                group = groups.get(id(spec))
                if group is None:
                    groups[id(spec)] = [spec, blocks, False]
                else:
                    group[1] += blocks
                    group[2] = True
        added = 0
        unfrozen: set[tuple[str, int]] = set()
        for spec, blocks, merged in groups.values():
            count = self._counts.get((id(spec), tuple(sorted(set(blocks))) if merged else blocks))
            a, u = count if count is not None else self.count_of(spec, tuple(sorted(set(blocks))))
            added += a
            if u:
                unfrozen |= u
        return added + self.unfrozen_count(frozenset(unfrozen)) if unfrozen else added

    def derived_size(self, method: str) -> str | None:
        """In a share space, the option of `method` that follows from its share of the budget (its size option, when
        the space searches it) rather than being drawn; None otherwise (`autopeft.space.shares`)."""
        if not self.space.shares or method not in self.methods:
            return None
        option = get_method(method).size_option
        domain = dict(self.methods[method].options).get(option) if option else None
        return option if domain is not None and domain.searched else None

    def plan(self, parts: Sequence[Part]) -> PeftPlan:
        blocks: dict[int, list[MethodSpec]] = {}
        global_parts = []
        for p in parts:
            spec = self.part_spec(p)
            if spec is None:
                continue
            if spec.scope == "global":
                global_parts.append(spec)
            for i in p.placed:
                blocks.setdefault(i, []).append(spec)
        return PeftPlan(blocks={i: tuple(s) for i, s in sorted(blocks.items())}, global_parts=tuple(global_parts))

    def params(self, parts: Sequence[Part]) -> dict[str, Any]:
        """The optuna parameters that, sampled directly, give these parts (conditional: only those asked; a share
        space asks a share weight instead of a size)."""
        out: dict[str, Any] = {}
        for p in parts:
            if p.depth is not None:
                if len(self.depths) > 1:
                    out[f"{p.unit}.{p.method}.depth"] = p.depth
                if len(self.space.sides) > 1 and p.depth:
                    out[f"{p.unit}.{p.method}.side"] = p.side
            elif (param := p.choice_param()) is not None:
                out[param] = p.method
            if not p.empty:
                derived = self.derived_size(p.method)
                out.update({p.option_param(k): v for k, v in p.values if k != derived})
                if p.share is not None:
                    out[p.option_param("share")] = p.share
        return out

    def parts_of(self, plan: PeftPlan) -> list[Part] | None:
        """The parts that give exactly `plan` (so `params(parts)` enqueues it as the sampler's own draw), or None when
        the space cannot express it (a method, size or placement it does not offer). A share space also needs the
        share weights that give its sizes: `autopeft.space.sampler.expressed_parts`."""
        parts = []
        for t in self.templates:
            part = self._part_of(t, plan)
            if part is None:
                return None
            parts.append(part)
        try:
            return parts if self.plan(parts) == plan else None
        except AutopeftError:
            return None

    def _part_of(self, t: Part, plan: PeftPlan) -> Part | None:
        """What `plan` holds at place `t` (checked against the whole plan by `parts_of`)."""
        if t.unit == GLOBAL_UNIT:
            held = [s for s in plan.global_parts if s.name in t.choices]
        elif t.depth is None:
            held = [s for s in plan.blocks.get(t.blocks[0], ()) if s.name in t.choices]
        else:  # a depth component: on its first or last `depth` blocks
            on = tuple(i for i in t.blocks if any(s.name == t.method for s in plan.blocks.get(i, ())))
            side = next((sd for sd in self.space.sides if replace(t, depth=len(on), side=sd).placed == on), None)
            if len(on) not in self.depths or side is None:
                return None
            t = replace(t, depth=len(on), side=side)
            held = [s for s in plan.blocks.get(on[0], ()) if s.name == t.method] if on else []
        if not held:
            if t.depth == 0:  # a depth component left out keeps its method: its parameter is `noah.<method>.depth`
                return replace(t, values=())
            return replace(t, method=NONE, values=()) if NONE in t.choices else None
        space = self.methods.get(held[0].name)
        if len(held) > 1 or space is None:
            return None
        options = {k: ",".join(v) if isinstance(v, (list, tuple)) else v
                   for k, v in held[0].to_dict().items() if k != "method"}
        if any(options.get(k) != v for k, v in space.fixed().items()):
            return None
        values = []
        for k, domain in space.searched():
            if not domain.contains(options.get(k)):
                return None
            values.append((k, options[k]))
        return replace(t, method=held[0].name, values=tuple(values))

    # -- extremes -----------------------------------------------------------------------------------------------------

    def configs(self, template: Part, method: str, pick: Callable[..., Any] = min,
                depth: int | None = None) -> Part:
        """`template` holding `method` with each searched option at its extreme count (`pick`: min or max),
        chosen option by option; depth (unless given) and side likewise in depth insertion."""
        if method == NONE:
            return replace(template, method=NONE, values=())
        values = {k: _extremes(d)[0] for k, d in self.methods[method].searched()}
        part = replace(template, method=method, values=tuple(values.items()))
        if part.depth is not None:
            depths = self.depths if depth is None else (depth,)
            part = pick((replace(part, depth=d, side=s) for d in depths for s in self.space.sides),
                        key=self.count_part)
        for k, d in self.methods[method].searched():
            candidates = [replace(part, values=tuple({**dict(part.values), k: v}.items())) for v in _extremes(d)]
            part = pick(candidates, key=self.count_part)
        return part

    def cheapest(self, template: Part) -> Part:
        """The smallest setting of a place over all its methods (ties: the earlier choice); cached per place."""
        key = (template.unit, template.slot)
        if key not in self._cheapest:
            self._cheapest[key] = min((self.configs(template, m, min) for m in template.choices), key=self.count_part)
        return self._cheapest[key]

    def largest(self, template: Part) -> Part:
        return max((self.configs(template, m, max) for m in template.choices), key=self.count_part)

    def smallest_parts(self) -> list[Part]:
        return [self.cheapest(t) for t in self.templates]

    def largest_parts(self) -> list[Part]:
        return [self.largest(t) for t in self.templates]

    def size(self) -> int | None:
        """Distinct plan configurations the sampler can ask for (None when an option is continuous). A share
        space asks share weights instead of sizes: counted as one weight per component, an upper bound."""
        total = 1
        for t in self.templates:
            count = 0
            for m in t.choices:
                derived = self.derived_size(m)
                maybe = [] if m == NONE else [len(self.space.shares) if k == derived else d.size()
                                              for k, d in self.methods[m].searched()]
                sizes = [n for n in maybe if n is not None]
                if len(sizes) < len(maybe):
                    return None
                options = math.prod(sizes)
                if t.depth is None:
                    count += options
                else:
                    count += sum(1 if d == 0 else options * len(self.space.sides) for d in self.depths)
            total *= count
        return total


def _extremes(domain: Domain) -> tuple[Any, ...]:
    """Values worth trying for the smallest or largest count: every choice, or a range's ends."""
    if domain.kind in ("int", "float"):
        return (domain.low, domain.high) if domain.kind == "float" else (int(domain.low), int(domain.high))
    return domain.values


@functools.lru_cache(maxsize=64)
def bind(space: SearchSpace, spec: BackboneSpec) -> BoundSpace:
    """Bind `space` to the backbone `spec` (cached)."""
    notes: list[str] = []
    all_blocks = tuple(range(spec.num_blocks))
    methods: dict[str, MethodSpace] = {}
    for name in space.method_names():
        kept = _bind_method(space.method(name), spec, all_blocks, notes)
        if kept is not None:
            methods[name] = kept

    def keep(choices: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(c for c in choices if c == NONE or c in methods)

    units = _units(space, spec)
    templates: list[Part] = []
    for unit, blocks in units:
        for slot in space.slots:
            choices = keep(slot.choices)
            if any(c != NONE for c in choices):
                templates.append(Part(unit, slot.name, choices, choices[0], blocks=blocks))
    for s in space.slots:
        if not any(c != NONE for c in keep(s.choices)):
            offered = ", ".join(c for c in s.choices if c != NONE)
            notes.append(f"slot {s.name} dropped: none of {offered} fits {spec.name}")
    depths = tuple(dict.fromkeys(min(d, spec.num_blocks) for d in space.depths))
    if depths != space.depths:
        notes.append(f"depths {list(space.depths)} clamped to the {spec.num_blocks} blocks of {spec.name}: "
                     f"{list(depths)}")
    for name in space.components():
        if name in methods:
            templates.append(Part(DEPTH_PREFIX, name, (name,), name, blocks=all_blocks, depth=depths[0],
                                  side=space.sides[0]))
    global_choices = keep(space.global_choices)
    if any(c != NONE for c in global_choices):
        templates.append(Part(GLOBAL_UNIT, "method", global_choices, global_choices[0]))
    if not templates:
        raise AutopeftError(f"{space.source}: no method of space '{space.name}' fits backbone {spec.name} "
                            f"({spec.family}): {'; '.join(notes)}")
    return BoundSpace(space, spec, templates, methods, depths, notes)


def _units(space: SearchSpace, spec: BackboneSpec) -> list[tuple[str, tuple[int, ...]]]:
    n = spec.num_blocks
    if space.mode == "block":
        return [(f"block{i}", (i,)) for i in range(n)]
    if space.mode == "group":
        g = space.group_size
        return [(f"group{k}", tuple(range(k * g, min(n, (k + 1) * g)))) for k in range(math.ceil(n / g))]
    return []


def _bind_method(ms: MethodSpace, spec: BackboneSpec, blocks: tuple[int, ...], notes: list[str]) -> MethodSpace | None:
    """`ms` without the option values `spec` rejects; None (with a note) when the method cannot go on `spec`."""
    cls = get_method(ms.name)
    if spec.family not in cls.families:
        notes.append(f"{ms.name} dropped: it does not support {spec.family} backbones ({spec.name})")
        return None
    fixed = ms.fixed()
    options = []
    for opt, domain in ms.options:
        if domain.kind != "choice":
            options.append((opt, domain))
            continue
        good = []
        for v in domain.values:
            try:
                make_spec(ms.name, {**fixed, opt: v}).check(spec, blocks)
                good.append(v)
            except UnsupportedBackbone as exc:
                notes.append(f"{ms.name}.{opt}={v} dropped: {exc}")
        if not good:
            notes.append(f"{ms.name} dropped: no value of {opt} fits {spec.name}")
            return None
        options.append((opt, Domain("choice", tuple(good)) if len(good) > 1 else Domain("fixed", tuple(good))))
    try:
        make_spec(ms.name, fixed).check(spec, blocks)
    except UnsupportedBackbone as exc:
        notes.append(f"{ms.name} dropped: {exc}")
        return None
    return MethodSpace(ms.name, tuple(options))
